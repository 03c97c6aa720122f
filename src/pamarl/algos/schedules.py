"""An on-policy update is a schedule of phases; this module owns the schedules and the factor.

A *phase* is a set of agents updated simultaneously from the same batch. A per-sample factor ``F``
starts at 1 and, after each phase, is multiplied by the probability ratios
``pi_i_new(a_i | o_i) / pi_i_old(a_i | o_i)`` of the agents the phase updated (in log space,
detached). The agents of a phase train with the factor accumulated by the phases before it:

* MAPPO / IPPO: one phase holding every agent (``F = 1``);
* HAPPO / HATRPO / HAA2C: one phase per agent in a random order; ``F`` is HAPPO's ``M`` (Kuba et al.
  2022, "Trust Region Policy Optimisation in Multi-Agent RL", eq. 11 / Algorithm 2);
* progressive asynchronous: one phase holding the regular agents, then one phase per critical agent
  in shuffled order (``../specs/progressive.md`` steps 5-6);
* fixed-ratio asynchronous: the same with a constant critical share.

Nothing here knows about losses: :func:`run_schedule` calls back into the algorithm's step rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class Plan:
    """The phases of one update, in order, and what the progressive schedule decided."""

    phases: list[list[int]]
    critical: list[int] = field(default_factory=list)
    """Critical agents in the order they are updated (sequential schedules: every agent)."""
    alpha: float | None = None
    k: int | None = None
    importance: list[float] | None = None


def simultaneous(n_agents: int) -> Plan:
    """MAPPO / IPPO: every agent in one phase."""
    return Plan(phases=[list(range(n_agents))], critical=[])


def sequential(n_agents: int, generator: torch.Generator) -> Plan:
    """HA family: one agent per phase, in a random permutation drawn from ``generator``."""
    order = torch.randperm(n_agents, generator=generator).tolist()
    return Plan(phases=[[i] for i in order], critical=order, k=n_agents)


def alpha_schedule(progress: float, alpha_init: float = 0.8, alpha_final: float = 0.2) -> float:
    """alpha(p) = alpha_init + (alpha_final - alpha_init) * p, with p clipped to [0, 1] (spec step 4)."""
    p = min(1.0, max(0.0, progress))
    return alpha_init + (alpha_final - alpha_init) * p


def critical_count(n_agents: int, alpha: float) -> int:
    """k = max(1, floor(N * alpha)), capped at N (spec step 4).

    A tiny tolerance keeps float noise from flooring an exact product down (0.6 * 5 = 2.9999...).
    """
    return min(n_agents, max(1, math.floor(n_agents * alpha + 1e-9)))


def rank_by_importance(importance: Sequence[float], tie_generator: torch.Generator) -> list[int]:
    """Agents sorted by importance, descending; ties broken by a seeded random key (spec step 3)."""
    keys = torch.rand(len(importance), generator=tie_generator).tolist()
    return sorted(range(len(importance)), key=lambda i: (-importance[i], keys[i]))


def progressive(
    importance: Sequence[float],
    alpha: float,
    generator: torch.Generator,
    tie_generator: torch.Generator,
) -> Plan:
    """Progressive asynchronous plan: regular agents in one phase, then critical agents one by one.

    The critical set is the top ``k`` by importance; it is shuffled with ``generator`` *after* being
    put in agent-id order, so that with every agent critical the order is exactly the one
    :func:`sequential` draws from the same generator state (the HAPPO special case of the spec).
    Tie-breaking draws from ``tie_generator`` so it never shifts the shuffle's random stream.
    """
    n = len(importance)
    k = critical_count(n, alpha)
    ranked = rank_by_importance(importance, tie_generator)
    crit_sorted = sorted(ranked[:k])
    regular = sorted(ranked[k:])
    perm = torch.randperm(k, generator=generator).tolist()
    critical = [crit_sorted[j] for j in perm]
    phases = ([regular] if regular else []) + [[i] for i in critical]
    return Plan(phases=phases, critical=critical, alpha=alpha, k=k, importance=list(importance))


@dataclass
class ScheduleResult:
    """What happened in a scheduled update."""

    factors: list[torch.Tensor]
    """The factor each phase trained with, ``[B]`` per phase (detached)."""
    phase_metrics: list[dict[str, float]]


StepRule = Callable[[list[int], torch.Tensor], dict[str, float]]
"""``(agents, factor [B]) -> metrics``: update these agents with this per-sample factor."""
LogRatio = Callable[[list[int]], torch.Tensor]
"""``agents -> [B]``: sum over the agents of ``log pi_new - log pi_old`` on the whole batch."""


def run_schedule(plan: Plan, batch_size: int, step: StepRule, log_ratio: LogRatio,
                 device: torch.device | str = "cpu") -> ScheduleResult:
    """Run the phases in order, carrying the factor between them.

    After phase ``j`` updates agents ``S_j``, ``F <- F * exp(sum_{i in S_j} log pi_i_new - log pi_i_old)``
    (recomputed on the whole batch after the update, detached), so the agents of a later phase train
    with the product of the ratios of every agent updated before them in this iteration.
    """
    factor = torch.ones(batch_size, device=device)
    factors, metrics = [], []
    for j, agents in enumerate(plan.phases):
        factors.append(factor)
        metrics.append(step(agents, factor))
        if j < len(plan.phases) - 1:  # the last phase's ratios feed no later phase
            with torch.no_grad():
                factor = factor * torch.exp(log_ratio(agents))
    return ScheduleResult(factors=factors, phase_metrics=metrics)


def factor_stats(result: ScheduleResult) -> dict[str, float]:
    """Mean, std, min and max of the factors the phases trained with (every phase, every sample)."""
    f = torch.cat(result.factors)
    return {
        "sched/factor_mean": float(f.mean()),
        "sched/factor_std": float(f.std(unbiased=False)),
        "sched/factor_min": float(f.min()),
        "sched/factor_max": float(f.max()),
    }
