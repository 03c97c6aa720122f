"""HATRPO: heterogeneous-agent trust region policy optimisation, one agent after another.

Kuba et al. 2022, "Trust Region Policy Optimisation in Multi-Agent Reinforcement Learning" (ICLR):
HATRPO is the practical form of their sequential trust-region procedure (HATRL, Algorithm 1). The
equation numbers below are those of the journal version, Zhong et al. 2024, "Heterogeneous-Agent
Reinforcement Learning" (JMLR), section 3.2.1. In a random permutation ``i_1..i_n``, agent ``i_m``
maximises the surrogate ``E[M_{i_1:m} * pi_{i_m}(a | o) / pi_{i_m}^old(a | o) * A]`` (eq. 7,
estimated through Proposition 11 / eq. 10 with ``M`` the product of the ratios of the agents updated
before it -- the schedule's factor ``F``) subject to the mean KL constraint
``E_s[KL(pi_{i_m}^old(.|s) || pi_{i_m}(.|s))] <= delta`` (eq. 7), by the TRPO step (eq. 8)::

    theta_new = theta_old + alpha^j * sqrt(2 delta / (x^T H x)) * x,   x = H^{-1} g,

with ``g`` the surrogate's gradient, ``H`` the Hessian of the mean KL at ``theta_old`` (a Fisher
matrix; products ``H v`` by double back-propagation, plus ``damping * v``), ``x`` from conjugate
gradient and ``alpha^j`` the first backtracking coefficient whose step keeps the KL on the batch within
``delta`` and improves the surrogate by at least ``accept_ratio`` of the linear prediction; when no
coefficient passes, the agent keeps its old parameters.

Only the step rule is HATRPO's own: the schedule (one phase per agent, random order) comes from
:class:`~pamarl.algos.happo.SequentialMixin` and the factor from :mod:`pamarl.algos.schedules`.
A phase holding several agents gives each its own independent trust-region step with the same factor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from pamarl.algos.common import check_finite, masked_mean
from pamarl.algos.happo import SequentialMixin
from pamarl.algos.onpolicy import OnPolicyAlgorithm, OnPolicyBatch, OnPolicyConfig
from pamarl.algos.registry import register
from pamarl.errors import UsageError
from pamarl.nets.policy import Actor

SHARED_PARAMS_MSG = (
    "hatrpo needs per-agent parameters (share_params=false): a trust-region step on shared parameters moves "
    "every agent's policy at once, so neither the per-agent KL constraint nor the sequential factor holds. "
    "Use happo or mappo for parameter sharing."
)


@dataclass
class HATRPOConfig(OnPolicyConfig):
    """HATRPO's step rule; defaults are HARL's (``harl/configs/algos_cfgs/hatrpo.yaml``).

    The actor takes no gradient-descent steps, so ``lr``, ``epochs``, ``minibatches``, ``clip`` and
    ``entropy_coef`` do not affect it (critics still use ``critic_lr``, ``critic_epochs``, ``minibatches``).
    """

    kl_threshold: float = 0.01
    """delta: bound on each agent's mean KL(pi_old || pi_new) over the batch (HARL's tuned MPE runs use 0.005)."""
    cg_iters: int = 10
    """Conjugate-gradient iterations for x = H^-1 g."""
    cg_residual_tol: float = 1e-10
    """Stop conjugate gradient once the squared residual falls below this."""
    damping: float = 0.1
    """Added to the KL Hessian (H + damping I) so that conjugate gradient sees a well-conditioned matrix."""
    ls_steps: int = 10
    """Backtracking line-search trials before giving up and keeping the old parameters."""
    accept_ratio: float = 0.5
    """Accept a trial only if its surrogate improvement is at least this share of the linear prediction g.step."""
    backtrack_coeff: float = 0.8
    """Trial j scales the full step by backtrack_coeff^j."""

    def validate(self) -> None:
        super().validate()
        if self.share_params:
            raise UsageError(SHARED_PARAMS_MSG)
        if self.kl_threshold <= 0:
            raise UsageError(f"kl_threshold must be > 0, got {self.kl_threshold}")
        if self.cg_iters < 1 or self.ls_steps < 1:
            raise UsageError("cg_iters and ls_steps must be >= 1")
        if self.damping < 0 or self.accept_ratio < 0:
            raise UsageError("damping and accept_ratio must be >= 0")
        if not 0 < self.backtrack_coeff < 1:
            raise UsageError(f"backtrack_coeff must lie in (0, 1), got {self.backtrack_coeff}")


# ---------------------------------------------------------------------- pure helpers
def conjugate_gradient(avp: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iters: int,
                       residual_tol: float = 1e-10) -> torch.Tensor:
    """Approximately solve ``A x = b`` for symmetric positive-definite ``A`` given only ``v -> A v``.

    Hestenes-Stiefel conjugate gradient from ``x = 0``; exact after ``dim(b)`` iterations in exact
    arithmetic, and TRPO needs only a few (Schulman et al. 2015, appendix C).
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = r @ r
    for _ in range(iters):
        if rr <= residual_tol:
            break
        ap = avp(p)
        alpha = rr / (p @ ap)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def categorical_kl(logp_old: torch.Tensor, logp_new: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``KL(old || new) = sum_a p_old(a) (log p_old(a) - log p_new(a))`` over allowed actions ``[..., A] -> [...]``."""
    terms = logp_old.exp() * (logp_old - logp_new)
    return torch.where(mask, terms, torch.zeros_like(terms)).sum(-1)


def gaussian_kl(mean_old: torch.Tensor, log_std_old: torch.Tensor, mean_new: torch.Tensor,
                log_std_new: torch.Tensor, dim_mask: torch.Tensor) -> torch.Tensor:
    """KL between diagonal Gaussians, summed over the real (unpadded) dimensions ``[..., D] -> [...]``.

    Per dimension: ``log(s1 / s0) + (s0^2 + (m0 - m1)^2) / (2 s1^2) - 1/2``.
    """
    var_ratio = torch.exp(2 * (log_std_old - log_std_new))
    z = (mean_old - mean_new) * torch.exp(-log_std_new)
    per_dim = (log_std_new - log_std_old) + 0.5 * (var_ratio + z.pow(2)) - 0.5
    return (per_dim * dim_mask).sum(-1)


def policy_dist(actor: Actor, obs: torch.Tensor, mask: torch.Tensor, agents: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """The selected agents' action distributions: ``(log-probs [B, k, A],)`` or ``(mean, log_std)``.

    Built from the same pieces as :meth:`Actor.evaluate` (masked logits, Gaussian head), so the KL
    below is the KL of exactly the policy whose ratios the surrogate uses.
    """
    idx = list(agents)
    out = actor.body(obs, idx)
    if actor.discrete:
        return (torch.log_softmax(actor._logits(out, mask), -1),)
    return actor._gaussian(out, idx)


def policy_kl(actor: Actor, old: tuple[torch.Tensor, ...], new: tuple[torch.Tensor, ...], mask: torch.Tensor,
              agents: Sequence[int]) -> torch.Tensor:
    """Per-sample ``KL(old || new)`` ``[B, k]`` between two outputs of :func:`policy_dist`."""
    if actor.discrete:
        return categorical_kl(old[0], new[0], mask)
    dim_mask = cast(torch.Tensor, actor.dim_mask)  # a registered buffer
    return gaussian_kl(old[0], old[1], new[0], new[1], dim_mask[list(agents)])


def flat(tensors: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate gradients (``None``: a parameter the output does not depend on -> zeros)."""
    return torch.cat([(torch.zeros_like(p) if t is None else t).reshape(-1) for t, p in zip(tensors, like)])


@torch.no_grad()
def set_flat(params: Sequence[nn.Parameter], vec: torch.Tensor) -> None:
    """Write ``vec`` into ``params`` in place (storage kept, so optimisers still point at them)."""
    i = 0
    for p in params:
        n = p.numel()
        p.copy_(vec[i:i + n].view_as(p))
        i += n


# ---------------------------------------------------------------------- algorithm
@register
class HATRPO(SequentialMixin, OnPolicyAlgorithm):
    """Sequential schedule + per-agent trust-region step (Kuba et al. 2022, HATRPO)."""

    name = "hatrpo"
    Config = HATRPOConfig
    paper = "Kuba et al. 2022, Trust Region Policy Optimisation in Multi-Agent Reinforcement Learning (HATRPO)"

    supports_shared_params = False
    shared_params_why = SHARED_PARAMS_MSG

    def actor_step(self, batch: OnPolicyBatch, agents: list[int], factor: torch.Tensor) -> dict[str, float]:
        """One trust-region step for each agent of the phase (the schedule gives one per phase)."""
        with torch.enable_grad():
            per_agent = [self.trust_region_step(batch, i, factor) for i in agents]
        stats = {key: [torch.tensor([s[key] for s in per_agent])] for key in per_agent[0]}
        return self._phase_stats(agents, stats)

    def trust_region_step(self, batch: OnPolicyBatch, i: int, factor: torch.Tensor) -> dict[str, float]:
        """Update agent ``i`` by eq. 8 with a backtracking line search; return its metrics.

        Touches only agent ``i``'s parameters (never any optimiser): the gradients are taken with
        ``torch.autograd.grad`` and the step is written into the parameters directly.
        """
        cfg = cast(HATRPOConfig, self.cfg)
        a = [i]
        params = self.actor.agent_parameters(i)
        assert batch.policy_adv is not None
        obs, amask = batch.obs[:, a], batch.action_mask[:, a]
        old_logp, adv, m = batch.logp[:, a], batch.policy_adv[:, a], batch.mask[:, a]
        f = factor.unsqueeze(-1)

        def surrogate() -> tuple[torch.Tensor, torch.Tensor]:
            # eq. 10: E[M * r * A]; the "-1" of eq. 10 is a constant and is left out, as in HARL.
            logp, ent = self._logp(batch, a)
            return masked_mean(f * torch.exp(logp - old_logp) * adv, m).sum(), masked_mean(ent, m).sum()

        with torch.no_grad():
            old_dist = tuple(t.detach() for t in policy_dist(self.actor, obs, amask, a))

        def mean_kl() -> torch.Tensor:
            kl = policy_kl(self.actor, old_dist, policy_dist(self.actor, obs, amask, a), amask, a)
            return masked_mean(kl, m).sum()

        theta0 = torch.cat([p.detach().reshape(-1) for p in params]).clone()
        obj0, ent0 = surrogate()
        check_finite(obj0, f"the HATRPO surrogate of agent {i}")
        base = float(obj0.detach())
        out = {"policy": -base, "entropy": float(ent0.detach()), "kl": 0.0, "ls_accepted": 0.0, "ls_frac": 0.0,
               "improve": 0.0, "step_size": 0.0}
        if float(m.sum()) == 0:  # the agent never acted in this batch: nothing to learn from
            return out
        g = flat(torch.autograd.grad(obj0, params, allow_unused=True), params)
        if not bool(torch.isfinite(g).all()) or float(g.norm()) == 0.0:
            return out

        # H v = d/dtheta (grad KL . v) at theta_old; the first derivative's graph is built once and
        # reused by every product (the KL's value and gradient there are 0; only its curvature is not).
        kl_grad = flat(torch.autograd.grad(mean_kl(), params, create_graph=True, allow_unused=True), params)

        def hvp(v: torch.Tensor) -> torch.Tensor:
            hv = torch.autograd.grad(kl_grad @ v, params, retain_graph=True, allow_unused=True)
            return flat(hv, params).detach() + cfg.damping * v

        x = conjugate_gradient(hvp, g.detach(), cfg.cg_iters, cfg.cg_residual_tol)
        xhx = float(x @ hvp(x))
        if not (xhx > 0 and torch.isfinite(x).all()):
            return out
        # The quadratic model 0.5 * s^T H s of the KL equals delta at the full step (eq. 8).
        step_size = (2 * cfg.kl_threshold / xhx) ** 0.5
        full_step = step_size * x
        expected = float(g @ full_step)  # linear prediction of the surrogate's improvement
        out["step_size"] = step_size

        with torch.no_grad():
            for j in range(cfg.ls_steps):
                frac = cfg.backtrack_coeff ** j
                set_flat(params, theta0 + frac * full_step)
                obj, ent = surrogate()
                kl = float(mean_kl())
                improve = float(obj) - base
                # Accept only inside the trust region and with a real, not merely predicted, improvement.
                if kl <= cfg.kl_threshold and improve > 0 and improve > cfg.accept_ratio * expected * frac:
                    out.update(policy=-float(obj), entropy=float(ent), kl=kl, ls_accepted=1.0, ls_frac=frac,
                               improve=improve)
                    return out
            set_flat(params, theta0)  # no trial passed: keep the old policy exactly
        return out
