"""On-policy rollout storage, generalised advantage estimation and value normalisation."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from pamarl.envs.base import BatchObs, BatchStep, EnvSpec


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    terminated: torch.Tensor,
    done: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over ``[T, ...]`` tensors.

    ``delta_t = r_t + gamma * (1 - terminated_t) * V(s'_t) - V(s_t)`` and
    ``A_t = delta_t + gamma * lam * (1 - done_t) * A_{t+1}``, where ``s'_t`` is the true successor
    of step ``t`` (the final observation when the episode ended). A time-limit truncation is
    ``done`` but not ``terminated``: the advantage recursion stops at the episode boundary, yet the
    truncated step still bootstraps from ``V(s'_t)``. Returns ``(advantages, returns = A + V)``.
    """
    if not (rewards.shape == values.shape == next_values.shape):
        raise ValueError(
            f"gae: rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and next_values "
            f"{tuple(next_values.shape)} must have the same shape"
        )
    not_term = 1.0 - terminated.to(rewards.dtype)
    not_done = 1.0 - done.to(rewards.dtype)
    while not_term.dim() < rewards.dim():  # [T, E] flags broadcast over agents
        not_term = not_term.unsqueeze(-1)
        not_done = not_done.unsqueeze(-1)
    deltas = rewards + gamma * not_term * next_values - values
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in range(rewards.shape[0] - 1, -1, -1):
        last = deltas[t] + gamma * lam * not_done[t] * last
        adv[t] = last
    return adv, adv + values


class ValueNorm(nn.Module):
    """Running normaliser of value targets (MAPPO, Yu et al. 2022, appendix: "value normalization").

    Keeps exponentially weighted first and second moments with bias correction:
    ``m <- beta m + (1 - beta) mean(x)``, ``s <- beta s + (1 - beta) mean(x^2)``,
    ``d <- beta d + (1 - beta)``; the debiased mean is ``m / d`` and the variance
    ``max(s / d - (m / d)^2, 1e-2)``. One statistic per trailing feature (e.g. per agent).
    """

    # Buffers registered in __init__ (declared here so the type checker sees tensors, not Module | Tensor).
    running_mean: torch.Tensor
    running_mean_sq: torch.Tensor
    debiasing_term: torch.Tensor

    def __init__(self, shape: int | tuple[int, ...], beta: float = 0.99999, eps: float = 1e-5):
        super().__init__()
        self.beta = beta
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("running_mean_sq", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("debiasing_term", torch.zeros((), dtype=torch.float64))

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.debiasing_term.clamp_min(self.eps)
        mean = self.running_mean / d
        var = (self.running_mean_sq / d - mean**2).clamp_min(1e-2)
        return mean, var

    @torch.no_grad()
    def update(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Update with a batch ``[..., *shape]`` (``weight`` masks out padded samples)."""
        x = x.double()
        dims = tuple(range(x.dim() - self.running_mean.dim()))
        if weight is None:
            bm, bsq = x.mean(dims), (x**2).mean(dims)
        else:
            w = weight.double()
            tot = w.sum(dims).clamp_min(1.0)
            bm, bsq = (x * w).sum(dims) / tot, (x**2 * w).sum(dims) / tot
        b = self.beta
        self.running_mean.mul_(b).add_(bm * (1 - b))
        self.running_mean_sq.mul_(b).add_(bsq * (1 - b))
        self.debiasing_term.mul_(b).add_(1 - b)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, var = self.stats()
        return ((x - mean) / var.sqrt()).to(x.dtype)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, var = self.stats()
        return (x * var.sqrt() + mean).to(x.dtype)


@dataclass
class Rollout:
    """One iteration's on-policy data, ``[T, E, ...]``; all per-agent fields are ``[T, E, N, ...]``."""

    obs: torch.Tensor
    state: torch.Tensor
    action_mask: torch.Tensor
    active: torch.Tensor
    action: torch.Tensor
    logp: torch.Tensor
    reward: torch.Tensor
    terminated: torch.Tensor
    done: torch.Tensor
    next_obs: torch.Tensor
    next_state: torch.Tensor
    cost: torch.Tensor | None = None


class RolloutBuffer:
    """Preallocated storage for ``T`` steps of ``E`` envs; filled by :meth:`add`, read by :meth:`data`.

    No values: the critics do not change during collection, so the update evaluates them on the stored
    states in one batched pass (:meth:`pamarl.algos.onpolicy.OnPolicyAlgorithm.prepare`) instead of per step.
    """

    def __init__(self, spec: EnvSpec, num_envs: int, length: int, with_cost: bool, device: torch.device):
        T, E, N = length, num_envs, spec.n_agents
        z = lambda *s, dt=torch.float32: torch.zeros(*s, dtype=dt, device=device)  # noqa: E731
        act_shape = (T, E, N) if spec.discrete else (T, E, N, spec.act_dim)
        self.length = T
        self.t = 0
        self._data = Rollout(
            obs=z(T, E, N, spec.obs_dim),
            state=z(T, E, spec.state_dim),
            action_mask=z(T, E, N, spec.act_dim, dt=torch.bool),
            active=z(T, E, N, dt=torch.bool),
            action=z(*act_shape, dt=torch.long if spec.discrete else torch.float32),
            logp=z(T, E, N),
            reward=z(T, E, N),
            terminated=z(T, E, dt=torch.bool),
            done=z(T, E, dt=torch.bool),
            next_obs=z(T, E, N, spec.obs_dim),
            next_state=z(T, E, spec.state_dim),
            cost=z(T, E, N) if with_cost else None,
        )

    def add(
        self,
        obs: BatchObs,
        action: torch.Tensor,
        logp: torch.Tensor,
        step: BatchStep,
    ) -> None:
        if self.t >= self.length:
            raise RuntimeError("RolloutBuffer is full; call reset() after the update")
        d, t = self._data, self.t
        d.obs[t] = obs.obs
        d.state[t] = obs.state
        d.action_mask[t] = obs.action_mask
        d.active[t] = obs.active
        d.action[t] = action
        d.logp[t] = logp
        d.reward[t] = step.reward
        d.terminated[t] = step.terminated
        d.done[t] = step.terminated | step.truncated
        d.next_obs[t] = step.final.obs
        d.next_state[t] = step.final.state
        if d.cost is not None:
            d.cost[t] = step.cost if step.cost is not None else 0.0
        self.t += 1

    @property
    def full(self) -> bool:
        return self.t >= self.length

    def data(self) -> Rollout:
        if not self.full:
            raise RuntimeError(f"RolloutBuffer holds {self.t} of {self.length} steps")
        return self._data

    def reset(self) -> None:
        self.t = 0


@dataclass
class OnPolicyBatch:
    """One iteration's samples flattened to ``B = T * E``; per-agent fields are ``[B, N, ...]``."""

    obs: torch.Tensor
    state: torch.Tensor
    action_mask: torch.Tensor
    active: torch.Tensor
    action: torch.Tensor
    logp: torch.Tensor
    """Log-probabilities under the acting policy."""
    mask: torch.Tensor
    """``active`` as 0/1 floats (the weights of every per-agent mean)."""
    value_old: torch.Tensor
    """Critic predictions at the rollout's states before this update (the weights it was collected with), in its
    training units (the centre of value clipping)."""
    ret: torch.Tensor
    """GAE returns ``A + V`` in reward units (the critics' targets)."""
    adv: torch.Tensor
    """Reward advantages (raw)."""
    cost_value_old: torch.Tensor | None = None
    cost_ret: torch.Tensor | None = None
    cost_adv: torch.Tensor | None = None
    policy_adv: torch.Tensor | None = None
    """The advantage the actors maximise, set by :meth:`OnPolicyAlgorithm.update`: the standardised
    reward advantage, or on safe tasks the Lagrangian mix of the separately standardised advantages."""

    @property
    def size(self) -> int:
        return int(self.obs.shape[0])

    def take(self, idx: torch.Tensor | slice, keep: Collection[str] | None = None,
             agents: list[int] | None = None) -> OnPolicyBatch:
        """The samples ``idx`` (a minibatch).

        ``keep``: take only these fields; the others are left as empty tensors (``torch.empty(0)``), so a
        minibatch for one purpose (an actor step reads six fields) gathers a fraction of the bytes.
        ``agents``: per-agent fields keep only these agents' columns (in this order), selected before the
        rows are gathered (a view when the agents are consecutive).
        """
        cols: slice | list[int] | None = None
        if agents is not None:
            consecutive = agents == list(range(agents[0], agents[0] + len(agents)))
            cols = slice(agents[0], agents[0] + len(agents)) if agents and consecutive else agents
        parts: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                parts[f.name] = None
            elif (keep is not None and f.name not in keep) or v is _EMPTY:  # left out here or before
                parts[f.name] = _EMPTY
            else:
                if cols is not None and f.name != "state":  # every field but the state is [B, N, ...]
                    v = v[:, cols]
                parts[f.name] = rows(v, idx)
        return replace(self, **parts)


def rows(x: torch.Tensor, idx: torch.Tensor | slice) -> torch.Tensor:
    """``x[idx]`` along the first dimension: a view for a slice, else ``index_select``, which gathers the same rows
    about 3x faster than ``x[idx]`` on a CPU (measured on [6,400, 1, 18] strided columns, 1,600 rows: 7.8 us
    against 23 us; an actor step gathers seven fields)."""
    return x[idx] if isinstance(idx, slice) else x.index_select(0, idx)


_EMPTY = torch.empty(0)
"""What :meth:`OnPolicyBatch.take` leaves in the fields it was not asked to keep."""
