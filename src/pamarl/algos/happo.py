"""HAPPO: heterogeneous-agent PPO, agents updated one after another in a random order.

Kuba et al. 2022, "Trust Region Policy Optimisation in Multi-Agent Reinforcement Learning" (ICLR),
Algorithm 2 / eq. 11: agent ``i_m`` of a random permutation maximises
``E[min(r A M, clip(r, 1 +- eps) A M)]`` where ``M`` is the product of the ratios
``pi_new / pi_old`` of the agents updated before it. The factor lives in
:mod:`pamarl.algos.schedules`; this file only chooses the sequential schedule.
"""

from __future__ import annotations

import torch

from pamarl.algos.base import Progress
from pamarl.algos.onpolicy import OnPolicyAlgorithm, OnPolicyBatch
from pamarl.algos.registry import register
from pamarl.algos.schedules import Plan, sequential


class SequentialMixin:
    """Plans one phase per agent in a random permutation (HAPPO, HATRPO, HAA2C)."""

    n: int
    generator: torch.Generator

    def plan(self, batch: OnPolicyBatch, progress: Progress) -> Plan:
        return sequential(self.n, self.generator)


# HAPPO's monotonic-improvement guarantee rests on the factor M of the agents updated *before* agent i_m
# (Kuba et al. 2022, Lemma 2 / eq. 11). With one shared network, updating agent i_m also moves every other
# agent's policy, so M no longer describes the joint policy that the next agent is optimised against.
SEQUENTIAL_SHARED_WHY = (
    "its sequential update weights each agent's surrogate by the product M of the ratios of the agents updated "
    "before it (Kuba et al. 2022, eq. 11); with shared parameters one agent's update moves every agent, so M no "
    "longer describes the joint policy. Use mappo for a parameter-shared PPO"
)


@register
class HAPPO(SequentialMixin, OnPolicyAlgorithm):
    name = "happo"
    paper = "Kuba et al. 2022, Trust Region Policy Optimisation in Multi-Agent Reinforcement Learning"
    supports_shared_params = False
    shared_params_why = SEQUENTIAL_SHARED_WHY
