"""Networks of the off-policy family: per-agent Q-networks (MLP or GRU), deterministic actors.

Like :class:`pamarl.nets.mlp.AgentMLP`, every module here evaluates all agents (or a chosen subset) in
one batched product, keeps each agent's weights as separate parameters (one network with
``shared``), and takes ``[..., N, in]`` inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pamarl.envs.base import EnvSpec
from pamarl.nets.mlp import AgentMLP

NEG_INF = -1e9


def masked_logits(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Forbidden actions get a very negative value. A row with no allowed action is left unmasked so
    that argmax and softmax stay defined (such an agent is inactive and its action ignored)."""
    mask = mask | ~mask.any(-1, keepdim=True)
    return x.masked_fill(~mask, NEG_INF)


class AgentGRUCell(nn.Module):
    """Per-agent GRU cells (Cho et al. 2014) evaluated together, with the gates of ``torch.nn.GRUCell``:
    ``r = s(W_ir x + W_hr h)``, ``z = s(W_iz x + W_hz h)``, ``n = tanh(W_in x + r * (W_hn h))``,
    ``h' = (1 - z) n + z h``.

    Over a sequence the input projections ``W_i. x`` of every step are computed in one product
    (:meth:`input_gates`) and only the recurrent product runs step by step (:meth:`recur`), with the
    per-agent recurrent weights stacked once per sequence (:meth:`recurrent_weights`).
    """

    def __init__(self, n_agents: int, in_dim: int, hidden: int, shared: bool = False):
        super().__init__()
        self.hidden = hidden
        self.n_agents = n_agents
        self.shared = shared
        self.ih = AgentMLP(n_agents, in_dim, 3 * hidden, hidden=(), shared=shared, stacked=True)
        self.hh = AgentMLP(n_agents, hidden, 3 * hidden, hidden=(), shared=shared, stacked=True)

    def agent_parameters(self, i: int) -> list[nn.Parameter]:
        return self.ih.agent_parameters(i) + self.hh.agent_parameters(i)

    def input_gates(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., N, in] -> [..., N, 3H]``."""
        return self.ih(x)

    def recurrent_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_h. [N, H, 3H]`` and ``b_h. [N, 1, 3H]`` for :meth:`recur`."""
        w, b = self.hh.layer_stacks()[0]
        if self.shared:
            w, b = w.expand(self.n_agents, -1, -1), b.expand(self.n_agents, -1, -1)
        return w, b

    def recur(self, gi: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """One step in agent-major layout: ``gi [N, B, 3H]``, ``h [N, B, H]`` -> ``h' [N, B, H]``."""
        gh = torch.baddbmm(b, h, w)
        xr, xz, xn = gi.chunk(3, -1)
        hr, hz, hn = gh.chunk(3, -1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return n + z * (h - n)  # = (1 - z) n + z h

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """One step: ``x [B, N, in]``, ``h [B, N, H]`` -> ``h' [B, N, H]``."""
        w, b = self.recurrent_weights()
        gi = self.input_gates(x).transpose(0, 1)
        return self.recur(gi, h.transpose(0, 1), w, b).transpose(0, 1)


class AgentQNet(nn.Module):
    """Utility networks ``Q_i(o_i, .)`` of every agent: an MLP, or (``rnn``) PyMARL's RNN agent
    ``fc -> relu -> GRU -> fc`` that conditions on the observation history (DRQN, Hausknecht & Stone 2015).

    ``forward(obs [..., N, O], h [..., N, H] | None) -> (q [..., N, A], h')``; ``h`` is ``None`` for MLPs.
    """

    def __init__(self, n_agents: int, obs_dim: int, n_actions: int, hidden: Sequence[int] = (64, 64),
                 activation: str = "relu", shared: bool = False, agent_id: bool = True, rnn: bool = False,
                 rnn_hidden: int = 64):
        super().__init__()
        self.n_agents = n_agents
        self.rnn = rnn
        self.rnn_hidden = rnn_hidden
        if rnn:
            self.fc1 = AgentMLP(n_agents, obs_dim, rnn_hidden, hidden=(), shared=shared, agent_id=agent_id,
                                stacked=True)
            self.gru = AgentGRUCell(n_agents, rnn_hidden, rnn_hidden, shared)
            self.fc2 = AgentMLP(n_agents, rnn_hidden, n_actions, hidden=(), shared=shared, stacked=True)
        else:
            self.mlp = AgentMLP(n_agents, obs_dim, n_actions, hidden, activation, shared, agent_id, stacked=True)

    def init_hidden(self, batch: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
        return torch.zeros(batch, self.n_agents, self.rnn_hidden, device=device) if self.rnn else None

    def forward(self, obs: torch.Tensor, h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One step for ``obs [B, N, O]`` (any leading dims for MLPs)."""
        if not self.rnn:
            return self.mlp(obs), None
        if h is None:
            h = torch.zeros(*obs.shape[:-1], self.rnn_hidden, dtype=obs.dtype, device=obs.device)
        h = self.gru(nn.functional.relu(self.fc1(obs)), h)
        return self.fc2(h), h

    def unroll(self, obs: torch.Tensor) -> torch.Tensor:
        """Q-values over sequences ``[B, T, N, O] -> [B, T, N, A]``, the hidden state starting at zero."""
        if not self.rnn:
            return self.mlp(obs)
        B, T = obs.shape[:2]
        gi = self.gru.input_gates(nn.functional.relu(self.fc1(obs)))  # every step at once: [B, T, N, 3H]
        gi = gi.permute(1, 2, 0, 3)  # [T, N, B, 3H]
        w, b = self.gru.recurrent_weights()
        h = torch.zeros(self.n_agents, B, self.rnn_hidden, dtype=obs.dtype, device=obs.device)
        hs = []
        for t in range(T):
            h = self.gru.recur(gi[t], h, w, b)
            hs.append(h)
        return self.fc2(torch.stack(hs).permute(2, 0, 1, 3))  # [B, T, N, H] -> [B, T, N, A]


class DeterministicActor(nn.Module):
    """Deterministic policies ``mu_i(o_i)`` of every agent (DDPG's actor, Lillicrap et al. 2016).

    Continuous: ``tanh`` outputs in [-1, 1] per dimension, padded dimensions of narrower agents held at
    zero; :meth:`to_env` maps them into the env's bounds exactly as :meth:`pamarl.nets.policy.Actor.to_env`
    does. Discrete: the outputs are logits (MADDPG's Gumbel-softmax relaxation works on them).
    """

    dim_mask: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor

    def __init__(self, spec: EnvSpec, hidden: Sequence[int] = (64, 64), activation: str = "relu",
                 shared: bool = False, agent_id: bool = True):
        super().__init__()
        self.discrete = spec.discrete
        self.n_agents = spec.n_agents
        self.act_dim = spec.act_dim
        self.body = AgentMLP(spec.n_agents, spec.obs_dim, spec.act_dim, hidden, activation, shared, agent_id,
                             out_gain=0.01, stacked=True)
        low, high = spec.padded_bounds()
        self.register_buffer("dim_mask", torch.as_tensor(spec.action_dim_mask(), dtype=torch.float32))
        self.register_buffer("low", torch.as_tensor(low))
        self.register_buffer("high", torch.as_tensor(high))

    def agent_parameters(self, i: int) -> list[nn.Parameter]:
        return self.body.agent_parameters(i)

    def forward(self, obs: torch.Tensor, agents: Sequence[int] | None = None) -> torch.Tensor:
        """Pre-activations ``[..., k, act_dim]`` (logits, or the argument of tanh)."""
        return self.body(obs, agents)

    def agent_dim_mask(self, agents: Sequence[int] | None = None) -> torch.Tensor:
        """The action-dimension mask ``[k, act_dim]`` of ``agents`` (default: all): 1 where a dimension exists."""
        return self.dim_mask if agents is None else self.dim_mask[list(agents)]

    def squash(self, pre: torch.Tensor, agents: Sequence[int] | None = None) -> torch.Tensor:
        """Continuous action in [-1, 1] from pre-activations; padded dimensions set to zero."""
        return torch.tanh(pre) * self.agent_dim_mask(agents)

    def squash_backward(self, pre: torch.Tensor, grad: torch.Tensor, agents: Sequence[int] | None = None
                        ) -> torch.Tensor:
        """``dL/dpre`` of :meth:`squash` from ``grad = dL/d action``: ``grad * mask * (1 - tanh(pre)^2)``."""
        return grad * self.agent_dim_mask(agents) * (1 - torch.tanh(pre).square())

    def to_env(self, action: torch.Tensor) -> torch.Tensor:
        """Discrete ids unchanged; continuous [-1, 1] actions mapped into ``[low, high]``."""
        if self.discrete:
            return action
        return self.low + (action.clamp(-1.0, 1.0) + 1.0) * 0.5 * (self.high - self.low)


def gumbel_softmax(logits: torch.Tensor, tau: float, generator: torch.Generator | None) -> torch.Tensor:
    """Straight-through Gumbel-softmax (Jang et al. 2017): a one-hot sample forward, the gradient of
    ``softmax((logits + g) / tau)`` backward. Noise comes from ``generator`` (resumable), not the global RNG."""
    hard, soft = gumbel_softmax_parts(logits, tau, generator)
    return hard - soft.detach() + soft


def gumbel_softmax_parts(logits: torch.Tensor, tau: float, generator: torch.Generator | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-hot sample and ``softmax((logits + g) / tau)`` of :func:`gumbel_softmax` (same noise draws)."""
    u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype, device=logits.device)
    e = -torch.log(u.clamp_min(1e-20))  # Exp(1) noise, >= 0
    g = -torch.log(e.clamp_min(1e-20))
    soft = torch.softmax((logits + g) / tau, -1)
    hard = nn.functional.one_hot(soft.argmax(-1), logits.shape[-1]).to(soft.dtype)
    return hard, soft


def gumbel_softmax_backward(soft: torch.Tensor, grad: torch.Tensor, tau: float) -> torch.Tensor:
    """``dL/dlogits`` of :func:`gumbel_softmax` from ``grad = dL/d sample``: the softmax's Jacobian,
    ``soft * (grad - <grad, soft>) / tau`` (the straight-through sample passes ``grad`` to ``soft``)."""
    return soft * (grad - (grad * soft).sum(-1, keepdim=True)) / tau
