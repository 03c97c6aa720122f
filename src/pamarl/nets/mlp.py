"""Per-agent MLPs evaluated together.

``AgentMLP`` holds one small MLP per agent (or one shared MLP) and evaluates any subset of agents in
one batched matrix product: inputs ``[B, k, in]`` for the ``k`` selected agents give ``[B, k, out]``.
Each agent's weights are separate ``nn.Parameter`` tensors, so that an optimiser per agent owns only
that agent's parameters and a sequential update of one agent never moves another (Adam's moments of
an untouched agent stay untouched). The weights are stacked on the fly for the batched product; the
stack is cheap next to the product itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch
from torch import nn

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": nn.functional.relu,
    "tanh": torch.tanh,
    "elu": nn.functional.elu,
}


def _init_linear(layer: nn.Linear, gain: float) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, gain=gain)
    nn.init.zeros_(layer.bias)
    return layer


class _MLP(nn.Module):
    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, out_gain: float, act_gain: float,
                 input_norm: bool = False, layer_norm: bool = False):
        super().__init__()
        # HARL's use_feature_normalization: LayerNorm (with its own affine) on the raw input.
        self.norm = nn.LayerNorm(in_dim) if input_norm else None
        # HARL's MLPLayer: Linear -> activation -> LayerNorm for every hidden layer.
        self.hidden_norms = nn.ModuleList(nn.LayerNorm(h) for h in hidden) if layer_norm else None
        dims = [in_dim, *hidden]
        self.layers = nn.ModuleList(_init_linear(nn.Linear(a, b), act_gain) for a, b in zip(dims[:-1], dims[1:]))
        self.layers.append(_init_linear(nn.Linear(dims[-1], out_dim), out_gain))

    def linear(self, j: int) -> nn.Linear:
        """Layer ``j`` (``nn.ModuleList`` indexes to a plain ``nn.Module`` for the type checker)."""
        return cast(nn.Linear, self.layers[j])


class AgentMLP(nn.Module):
    """``n_agents`` MLPs ``in_dim -> hidden -> out_dim``; one shared MLP when ``shared``.

    Args:
        agent_id: with ``shared``, append a one-hot agent id to the input so the shared network can
            tell agents apart.
        out_gain: orthogonal-init gain of the output layer (0.01 for policy logits, 1 for values).
        input_norm: LayerNorm on the inputs, one per agent network (HARL's ``use_feature_normalization``).
        layer_norm: LayerNorm after every hidden activation (HARL's MLP layers).
    """

    def __init__(
        self,
        n_agents: int,
        in_dim: int,
        out_dim: int,
        hidden: Sequence[int] = (128, 128),
        activation: str = "relu",
        shared: bool = False,
        agent_id: bool = False,
        out_gain: float = 1.0,
        input_norm: bool = False,
        layer_norm: bool = False,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        self.n_agents = n_agents
        self.shared = shared
        self.agent_id = agent_id and shared
        self.act = ACTIVATIONS[activation]
        gain = nn.init.calculate_gain("relu" if activation == "relu" else "tanh")
        real_in = in_dim + (n_agents if self.agent_id else 0)
        n_nets = 1 if shared else n_agents
        self.input_norm = input_norm
        self.layer_norm = layer_norm
        self.nets = nn.ModuleList(_MLP(real_in, hidden, out_dim, out_gain, gain, input_norm, layer_norm)
                                  for _ in range(n_nets))
        self.n_layers = len(hidden) + 1
        self._cache: dict[tuple[int, ...], tuple[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]]] = {}

    def _net(self, i: int) -> _MLP:
        # self.nets only ever holds _MLPs; nn.ModuleList indexes to a plain nn.Module.
        return cast(_MLP, self.nets[i])

    def agent_parameters(self, i: int) -> list[nn.Parameter]:
        """Parameters that agent ``i``'s output depends on (all of them when shared)."""
        return list(self.nets[0 if self.shared else i].parameters())

    def _stacks(self, idx: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer stacked weights of the agents ``idx``.

        Without autograd (acting, every env step) the stacks are cached and rebuilt only when a
        parameter changed (its in-place version counter moved), which saves the copies per step.
        Optimisers must therefore update parameters through ordinary in-place tensor ops (the default
        and ``foreach`` torch.optim paths do); ``fused=True`` kernels do not bump the version counter
        and would leave acting on stale weights.
        """
        def build() -> list[tuple[torch.Tensor, torch.Tensor]]:
            return [
                (torch.stack([self._net(i).linear(j).weight for i in idx]).transpose(1, 2),
                 torch.stack([self._net(i).linear(j).bias for i in idx]).unsqueeze(1))
                for j in range(self.n_layers)
            ]

        if torch.is_grad_enabled():
            return build()
        key = tuple(idx)
        version = tuple(p._version for p in self.parameters())
        cached = self._cache.get(key)
        if cached is None or cached[0] != version:
            cached = (version, [(w.contiguous(), b.contiguous()) for w, b in build()])
            self._cache[key] = cached
        return cached[1]

    @staticmethod
    def _agent_layer_norm(h: torch.Tensor, norms: list[nn.LayerNorm]) -> torch.Tensor:
        """LayerNorm of ``[k, B, d]`` with each agent's own scale and shift (normalise, then ``[k, 1, d]`` affine)."""
        h = nn.functional.layer_norm(h, h.shape[-1:], eps=norms[0].eps)
        g = torch.stack([n.weight for n in norms]).unsqueeze(1)
        b = torch.stack([n.bias for n in norms]).unsqueeze(1)
        return torch.addcmul(b, h, g)

    def forward(self, x: torch.Tensor, agents: Sequence[int] | None = None) -> torch.Tensor:
        """``x``: ``[..., k, in]`` for the ``k`` agents in ``agents`` (default: all) -> ``[..., k, out]``."""
        idx = list(range(self.n_agents)) if agents is None else list(agents)
        lead = x.shape[:-2]
        k = x.shape[-2]
        if k != len(idx):
            raise ValueError(f"AgentMLP: input has {k} agents but {len(idx)} were selected")
        if self.agent_id:
            eye = torch.eye(self.n_agents, dtype=x.dtype, device=x.device)[idx]
            x = torch.cat([x, eye.expand(*lead, k, self.n_agents)], -1)
        if self.shared or k == 1:  # one network: plain modules, no stacking
            net = self._net(0 if self.shared else idx[0])
            h = x if net.norm is None else net.norm(x)
            for j, layer in enumerate(net.layers):
                h = layer(h)
                if j < self.n_layers - 1:
                    h = self.act(h)
                    if net.hidden_norms is not None:
                        h = net.hidden_norms[j](h)
            return h
        h = x.reshape(-1, k, x.shape[-1]).transpose(0, 1)  # [k, B, in]
        if self.input_norm:
            h = self._agent_layer_norm(h, [cast(nn.LayerNorm, self._net(i).norm) for i in idx])
        stacks = self._stacks(idx)
        for j in range(self.n_layers):
            w, b = stacks[j]  # [k, in, out], [k, 1, out]
            h = torch.baddbmm(b, h, w)
            if j < self.n_layers - 1:
                h = self.act(h)
                if self.layer_norm:
                    h = self._agent_layer_norm(
                        h, [cast(nn.LayerNorm, cast(nn.ModuleList, self._net(i).hidden_norms)[j]) for i in idx])
        return h.transpose(0, 1).reshape(*lead, k, h.shape[-1])
