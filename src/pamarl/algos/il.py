"""IL: independent Q-learning with the MF-Q network minus its mean-action input (the baseline of Yang et
al. 2018, Sec. 5). Same team-shared network, Boltzmann exploration, per-agent replay with terminal
transitions and soft target updates as :mod:`pamarl.algos.mfq`; the target is Q-learning's
``y = r + gamma (1 - done) max_a Q^-(o', a)`` (double DQN with ``double_q=true``)."""

from __future__ import annotations

import torch

from pamarl.algos.mfq import MFQ, il_next_value
from pamarl.algos.registry import register


@register
class IL(MFQ):
    """Independent Q-learners sharing one network, no mean action."""

    name = "il"
    paper = "Yang et al. 2018 (IL baseline); Tan 1993"
    mean_action = False

    def next_value(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return il_next_value(self, b)
