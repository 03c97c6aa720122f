"""IQL: independent Q-learning, one DQN per agent on its own observation and reward.

Tan 1993, "Multi-Agent Reinforcement Learning: Independent vs. Cooperative Agents"; with deep
Q-networks as in Tampuu et al. 2017. Each agent ``i`` minimises
``(Q_i(o_i, a_i) - (r_i + gamma * (1 - d) * Q_i^-(o_i', a_i'*)))^2`` where ``a_i'*`` is the online
network's greedy allowed action (double Q-learning, van Hasselt et al. 2016) and ``Q^-`` the target
network. The other agents are part of the environment from each learner's point of view, which is why
IQL has no convergence guarantee, but it is the baseline every factorisation is measured against.
Each agent learns from the reward the run's convention gives it (``reward=team``: the team's summed
reward; ``reward=individual``: its own).
"""

from __future__ import annotations

import torch

from pamarl.algos.offpolicy import td_target
from pamarl.algos.registry import register
from pamarl.algos.value_based import ValueBasedAlgorithm, ValueConfig


@register
class IQL(ValueBasedAlgorithm):
    """Independent (double) DQN learners; parameter sharing with ``share_params=true``."""

    name = "iql"
    Config = ValueConfig
    paper = "Tan 1993, Multi-Agent Reinforcement Learning: Independent vs. Cooperative Agents"

    def loss(self, p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # An agent that is gone at the successor has nothing to bootstrap from.
        y = td_target(p["reward"], p["terminated"], p["q_next"] * p["next_active"], p["discount"])
        w = p["active"] * p["weight"].unsqueeze(-1)
        loss = self.td_error_loss(p["q"] - y, w)
        return loss, {"train/target": (y * w).sum() / w.sum().clamp_min(1.0)}
