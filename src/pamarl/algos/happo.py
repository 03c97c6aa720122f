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
from pamarl.algos.onpolicy import OnPolicyAlgorithm
from pamarl.algos.registry import register
from pamarl.algos.schedules import Plan, sequential


class SequentialMixin:
    """Plans one phase per agent in a random permutation (HAPPO, HATRPO, HAA2C)."""

    n: int
    generator: torch.Generator

    def plan(self, batch: dict[str, torch.Tensor], progress: Progress) -> Plan:
        return sequential(self.n, self.generator)


@register
class HAPPO(SequentialMixin, OnPolicyAlgorithm):
    name = "happo"
    paper = "Kuba et al. 2022, Trust Region Policy Optimisation in Multi-Agent Reinforcement Learning"
