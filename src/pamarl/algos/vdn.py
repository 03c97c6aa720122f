"""VDN: value-decomposition networks, ``Q_tot(s, a) = sum_i Q_i(o_i, a_i)``.

Sunehag et al. 2018, "Value-Decomposition Networks for Cooperative Multi-Agent Learning", eq. 1. The
sum is trained end to end on the team TD error
``(sum_i Q_i(o_i, a_i) - (r + gamma * (1 - d) * sum_i Q_i^-(o_i', a_i'*)))^2``; since the sum is
monotonic in every ``Q_i``, the greedy joint action is each agent's greedy action, so execution stays
decentralised. The team reward is the sum of the agents' rewards (the run's reward convention, ``reward=``).
"""

from __future__ import annotations

from torch import nn

from pamarl.algos.registry import register
from pamarl.algos.value_based import ValueBasedAlgorithm, ValueConfig
from pamarl.nets.mixers import VDNMixer


@register
class VDN(ValueBasedAlgorithm):
    """Additive value decomposition over the agents' (double-Q) utilities."""

    name = "vdn"
    Config = ValueConfig
    paper = "Sunehag et al. 2018, Value-Decomposition Networks for Cooperative Multi-Agent Learning"

    def make_mixer(self) -> nn.Module:
        return VDNMixer()
