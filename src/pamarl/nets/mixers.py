"""Value-decomposition mixers: Q_tot from the agents' chosen-action values.

* VDN (Sunehag et al. 2018, "Value-Decomposition Networks for Cooperative Multi-Agent Learning",
  eq. 1): ``Q_tot = sum_i Q_i``.
* QMIX (Rashid et al. 2018, "QMIX: Monotonic Value Function Factorisation for Deep Multi-Agent
  Reinforcement Learning", section 4.1 / eq. 5): ``Q_tot = W2^T elu(W1^T Q + b1) + b2`` where
  hypernetworks of the global state produce ``W1, b1, W2, b2``; the weights pass through an absolute
  value so that ``dQ_tot / dQ_a >= 0`` for every agent ``a`` (their eq. 5), which makes the greedy
  joint action the per-agent greedy actions (their eq. 4). The final bias is a small MLP of the
  state (a state value ``V(s)``), free in sign.

Both take ``qs [..., N]`` and ``state [..., S]`` with any leading dims and return ``[...]``.
"""

from __future__ import annotations

import torch
from torch import nn


class VDNMixer(nn.Module):
    """Q_tot = sum of the agents' values (the state is ignored)."""

    def forward(self, qs: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        return qs.sum(-1)


class QMixer(nn.Module):
    """Monotonic mixing network whose weights come from hypernetworks of the global state.

    Args:
        embed_dim: width of the mixing layer (32 in the paper).
        hypernet_layers: 1 -- the weight hypernetworks are linear maps of the state (the paper);
            2 -- one hidden layer of ``hypernet_embed`` units (PyMARL's default for harder tasks).
        init_scale: factor on the default initial weights of the hypernetworks' output layers; their
            biases start at ``1 / sqrt(embed_dim)`` so that the initial mixer is close to VDN's sum.
    """

    def __init__(self, n_agents: int, state_dim: int, embed_dim: int = 32, hypernet_layers: int = 2,
                 hypernet_embed: int = 64, init_scale: float = 0.1):
        super().__init__()
        if hypernet_layers not in (1, 2):
            raise ValueError(f"hypernet_layers must be 1 or 2, got {hypernet_layers}")
        self.n_agents = n_agents
        self.embed_dim = embed_dim

        def hyper(out: int) -> nn.Module:
            if hypernet_layers == 1:
                return nn.Linear(state_dim, out)
            return nn.Sequential(nn.Linear(state_dim, hypernet_embed), nn.ReLU(), nn.Linear(hypernet_embed, out))

        self.hyper_w1 = hyper(n_agents * embed_dim)
        self.hyper_w2 = hyper(embed_dim)
        self.hyper_b1 = nn.Linear(state_dim, embed_dim)
        self.hyper_b2 = nn.Sequential(nn.Linear(state_dim, embed_dim), nn.ReLU(), nn.Linear(embed_dim, 1))
        # Start as VDN: mixing weights |w1| = |w2| = 1 / sqrt(embed) give dQ_tot/dQ_i = sum_e |w2_e||w1_ie| = 1
        # (in elu's linear range), with a weak state dependence to learn from. torch's default init gives
        # gains of 5-15 on a 50-dim state; gamma * gain > 1 makes the greedy bootstrap an expansion, and on
        # MPE we saw Q_tot run away to values above any possible return.
        for net in (self.hyper_w1, self.hyper_w2):
            last = net if isinstance(net, nn.Linear) else list(net.children())[-1]
            assert isinstance(last, nn.Linear)
            with torch.no_grad():
                last.weight.mul_(init_scale)
                last.bias.fill_(embed_dim**-0.5)

    def forward(self, qs: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        lead = qs.shape[:-1]
        q = qs.reshape(-1, 1, self.n_agents)
        s = state.reshape(-1, state.shape[-1])
        # abs() keeps every mixing weight non-negative: the monotonicity constraint of QMIX eq. 5.
        w1 = self.hyper_w1(s).abs().view(-1, self.n_agents, self.embed_dim)
        b1 = self.hyper_b1(s).view(-1, 1, self.embed_dim)
        hidden = nn.functional.elu(torch.bmm(q, w1) + b1)  # elu is monotonic increasing
        w2 = self.hyper_w2(s).abs().view(-1, self.embed_dim, 1)
        b2 = self.hyper_b2(s).view(-1, 1, 1)
        return (torch.bmm(hidden, w2) + b2).reshape(lead)
