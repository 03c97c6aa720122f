"""QMIX: monotonic value factorisation with a state-conditioned mixing network.

Rashid et al. 2018, "QMIX: Monotonic Value Function Factorisation for Deep Multi-Agent Reinforcement
Learning" (ICML). ``Q_tot(s, a) = f_s(Q_1(o_1, a_1), ..., Q_N(o_N, a_N))`` where hypernetworks of the
global state ``s`` produce non-negative mixing weights, so that ``dQ_tot / dQ_i >= 0`` (their eq. 5)
and the joint greedy action decomposes into per-agent greedy actions (eq. 4). The whole is trained on
``(Q_tot(s, a) - (r + gamma * (1 - d) * Q_tot^-(s', a'*)))^2`` (eq. 6) with target networks for the
agents and the mixer, ``a'*`` the online agents' greedy allowed actions (double Q-learning).
The mixer is :class:`pamarl.nets.mixers.QMixer`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pamarl.algos.registry import register
from pamarl.algos.value_based import ValueBasedAlgorithm, ValueConfig
from pamarl.errors import UsageError
from pamarl.nets.mixers import QMixer


@dataclass
class QMIXConfig(ValueConfig):
    """QMIX's hyperparameters."""

    mixing_embed: int = 32
    """Width of the mixing network's hidden layer."""
    hypernet_layers: int = 2
    """Layers of the weight hypernetworks: 1 (linear, the paper) or 2."""
    hypernet_embed: int = 64
    """Hidden width of 2-layer hypernetworks."""

    def validate(self) -> None:
        super().validate()
        if self.hypernet_layers not in (1, 2):
            raise UsageError(f"hypernet_layers must be 1 or 2, got {self.hypernet_layers}")
        if self.mixing_embed < 1 or self.hypernet_embed < 1:
            raise UsageError("mixing_embed and hypernet_embed must be >= 1")


@register
class QMIX(ValueBasedAlgorithm):
    """Agents' utilities mixed monotonically, conditioned on the global state."""

    name = "qmix"
    Config = QMIXConfig
    paper = "Rashid et al. 2018, QMIX: Monotonic Value Function Factorisation for Deep Multi-Agent RL"
    cfg: QMIXConfig

    def make_mixer(self) -> nn.Module:
        c = self.cfg
        return QMixer(self.spec.n_agents, self.spec.state_dim, c.mixing_embed, c.hypernet_layers, c.hypernet_embed)
