"""The progressive asynchronous update, pamarl's own algorithm (``../shared/specs/progressive.md``).

Each iteration ranks agents by an importance score built from their losses, makes the top
``k = max(1, floor(N * alpha(p)))`` *critical* and the rest *regular*, and updates

1. the regular agents together, from the same old joint policy (PPO surrogate, factor 1; spec step 5);
2. then the critical agents one by one in a shuffled order, each with HAPPO's surrogate
   ``min(r_i F A_i, clip(r_i, 1 +- eps) F A_i)``, where ``F`` is the product of the ratios of every
   agent updated before it in this iteration, regular ones included (spec step 6).

``alpha`` decays linearly from ``alpha_init`` (0.8) to ``alpha_final`` (0.2) over training (step 4):
early on most agents explore sequentially, late on most move together. Each agent has a value critic
``V_i(s)`` and, on tasks with a cost, a cost critic ``C_i(s)``; the actors then maximise the
Lagrangian advantage ``(A_i - lambda A^c_i) / (1 + lambda)`` and ``lambda`` follows dual ascent on
the mean episode cost (step 8).

Choices where the spec leaves room (see also the config's docstrings):

* Importance uses the critics' squared errors in reward (cost) units on this iteration's batch,
  before the critics are fitted, and ``|last clipped-surrogate loss|`` of each agent's most recent
  update; each term is divided by its mean over agents plus ``importance_eps`` (step 3).
* ``lambda`` is updated once per iteration, after the actors' update, from the mean cost of the
  episodes that finished during the iteration (no update if none finished).
* ``fixed_ratio`` is the same algorithm with ``alpha_init = alpha_final = 0.5`` by default.
* With ``alpha_init = alpha_final = 1`` every agent is critical and the update is exactly HAPPO's:
  the critical set is put in agent-id order before the seeded shuffle, so the order equals HAPPO's
  permutation from the same generator state, and tie-breaking draws from a separate generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pamarl.algos.base import ActOut, Metrics, Progress
from pamarl.algos.common import masked_mean
from pamarl.algos.happo import SEQUENTIAL_SHARED_WHY
from pamarl.algos.onpolicy import OnPolicyAlgorithm, OnPolicyBatch, OnPolicyConfig
from pamarl.algos.registry import register
from pamarl.algos.schedules import Plan, alpha_schedule, progressive
from pamarl.config import TrainConfig
from pamarl.envs.base import BatchObs, BatchStep, EnvSpec
from pamarl.errors import UsageError


@dataclass
class ProgressiveConfig(OnPolicyConfig):
    """The progressive update's own knobs on top of the on-policy ones."""

    alpha_init: float = 0.8
    """Critical share at the start of training (alpha(0))."""
    alpha_final: float = 0.2
    """Critical share at the end of training (alpha(1))."""
    w_value: float = 1.0
    """Weight of the value-loss term of the importance score."""
    w_policy: float = 1.0
    """Weight of the policy-loss term of the importance score."""
    w_cost: float = 1.0
    """Weight of the cost-loss term of the importance score (tasks with a cost)."""
    importance_eps: float = 1e-8
    """Added to each term's mean over agents before dividing (keeps an all-zero term at zero)."""
    lambda_init: float = 0.0
    """Initial Lagrange multiplier of the cost constraint."""
    lambda_lr: float = 0.05
    """Dual-ascent step: lambda <- max(0, lambda + lambda_lr * (mean episode cost - cost_limit))."""

    def validate(self) -> None:
        super().validate()
        for name in ("alpha_init", "alpha_final"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise UsageError(f"{name} must lie in [0, 1], got {v}")
        if self.lambda_init < 0 or self.lambda_lr < 0:
            raise UsageError("lambda_init and lambda_lr must be >= 0")


@register
class Progressive(OnPolicyAlgorithm):
    name = "progressive"
    Config = ProgressiveConfig
    paper = "pamarl's progressive asynchronous update (specs/progressive.md; HAPPO factor from Kuba et al. 2022)"
    uses_cost = True
    needs_per_agent_critics = True
    supports_shared_params = False
    shared_params_why = "the critical agents' sequential phase is HAPPO's: " + SEQUENTIAL_SHARED_WHY

    def __init__(self, spec: EnvSpec, cfg: ProgressiveConfig, run: TrainConfig, device: torch.device):
        super().__init__(spec, cfg, run, device)
        self.cfg: ProgressiveConfig = cfg
        # Ties in the importance ranking draw from their own stream so they never shift the shuffle.
        self.tie_generator = torch.Generator(device="cpu")
        self.tie_generator.manual_seed(run.seed + 1_000_003)
        self.lagrange = float(cfg.lambda_init)
        self.cost_limit: float | None = None
        self._episode_costs: list[float] = []

    # ------------------------------------------------------------------ collection
    def observe(self, obs: BatchObs, out: ActOut, step: BatchStep) -> None:
        super().observe(obs, out, step)
        if self.cost_critic is not None:
            self._episode_costs.extend(e.cost for e in step.episodes)

    # ------------------------------------------------------------------ spec steps 3, 4, 8
    @torch.no_grad()
    def importance(self, batch: OnPolicyBatch) -> torch.Tensor:
        """I_i = w_v Lv_i / mean(Lv) + w_p Lp_i / mean(Lp) + w_c Lc_i / mean(Lc) (spec step 3)."""
        cfg, m = self.cfg, batch.mask
        s, o = batch.state, batch.obs
        lv = masked_mean((self.critic.value(s, o) - batch.ret).pow(2), m)
        lp = self.last_policy_loss.abs().to(lv.device)
        if self.cost_critic is not None and batch.cost_ret is not None:
            lc = masked_mean((self.cost_critic.value(s, o) - batch.cost_ret).pow(2), m)
        else:
            lc = torch.zeros_like(lv)

        def scaled(x: torch.Tensor) -> torch.Tensor:
            return x / (x.mean() + cfg.importance_eps)

        return cfg.w_value * scaled(lv) + cfg.w_policy * scaled(lp) + cfg.w_cost * scaled(lc)

    def plan(self, batch: OnPolicyBatch, progress: Progress) -> Plan:
        imp = self.importance(batch)
        alpha = alpha_schedule(progress.fraction, self.cfg.alpha_init, self.cfg.alpha_final)
        return progressive(imp.tolist(), alpha, self.generator, self.tie_generator)

    def policy_advantage(self, batch: OnPolicyBatch, progress: Progress) -> torch.Tensor:
        """(A_i - lambda A^c_i) / (1 + lambda) on tasks with a cost (spec step 8), else A_i.

        Both advantages are standardised *separately* before they are mixed (as OmniSafe's PPO-Lag
        does), so lambda weighs a unit of cost advantage against a unit of reward advantage whatever the
        two signals' scales, and the mix is not re-standardised afterwards (which would undo lambda's
        weighting).
        """
        adv = self.standardise(batch.adv, batch.mask)
        if batch.cost_adv is None:
            return adv
        lam = self.lagrange
        return (adv - lam * self.standardise(batch.cost_adv, batch.mask)) / (1.0 + lam)

    def update(self, progress: Progress) -> Metrics:
        metrics = super().update(progress)
        if self.cost_critic is not None:
            if self._episode_costs and self.cost_limit is not None:
                mean_cost = sum(self._episode_costs) / len(self._episode_costs)
                self.lagrange = max(0.0, self.lagrange + self.cfg.lambda_lr * (mean_cost - self.cost_limit))
            self._episode_costs = []
        metrics["cost/lambda"] = self.lagrange
        return metrics

    def reset_rollout(self) -> None:
        self._episode_costs = []

    def plan_metrics(self, plan: Plan, result: Any) -> Metrics:
        out = super().plan_metrics(plan, result)
        out["sched/alpha"] = float(plan.alpha) if plan.alpha is not None else float("nan")
        out["sched/k"] = int(plan.k or 0)
        out["sched/critical"] = ";".join(str(i) for i in plan.critical)
        for i, v in enumerate(plan.importance or []):
            out[f"sched/importance_{i}"] = float(v)
        return out

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict[str, Any]:
        return {"lagrange": self.lagrange, "tie_generator": self.tie_generator.get_state(),
                "episode_costs": list(self._episode_costs)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.lagrange = float(state["lagrange"])
        self.tie_generator.set_state(state["tie_generator"])
        self._episode_costs = list(state.get("episode_costs", []))


@dataclass
class FixedRatioConfig(ProgressiveConfig):
    alpha_init: float = 0.5
    """Constant critical share (alpha_init = alpha_final)."""
    alpha_final: float = 0.5
    """Equal to alpha_init for the fixed-ratio baseline."""


@register
class FixedRatio(Progressive):
    """Fixed-ratio asynchronous baseline: the progressive update with a constant critical share."""

    name = "fixed_ratio"
    Config = FixedRatioConfig
    paper = "fixed-ratio asynchronous baseline of the design document (progressive with constant alpha)"
