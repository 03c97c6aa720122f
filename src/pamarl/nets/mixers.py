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

from typing import Any

import torch
from torch import nn

from pamarl.nets.mlp import add_grad


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
        self.manual = True
        """Train through :class:`_ManualMix` (one autograd node, hand-written backward) instead of autograd's
        graph of about 25 nodes; same values and gradients (``tests/test_manual_grad.py``)."""
        for net in (self.hyper_w1, self.hyper_w2):
            last = net if isinstance(net, nn.Linear) else list(net.children())[-1]
            assert isinstance(last, nn.Linear)
            with torch.no_grad():
                last.weight.mul_(init_scale)
                last.bias.fill_(embed_dim**-0.5)

    def forward(self, qs: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        if self.manual and torch.is_grad_enabled() and qs.requires_grad and not state.requires_grad:
            return _ManualMix.apply(qs, state, self)
        return self._forward(qs, state)

    def _forward(self, qs: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
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


def _linears(net: nn.Module) -> list[nn.Linear]:
    """The linear layers of a hypernetwork (``Linear``, or ``Linear, ReLU, Linear``), in order."""
    return [net] if isinstance(net, nn.Linear) else [m for m in net.children() if isinstance(m, nn.Linear)]


def _hyper_forward(net: nn.Module, s: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A hypernetwork on ``s [M, S]``; returns the output and each layer's input (the second a relu output)."""
    layers = _linears(net)
    ins, h = [], s
    for j, lin in enumerate(layers):
        ins.append(h)
        h = torch.addmm(lin.bias, h, lin.weight.t())
        if j < len(layers) - 1:
            h = torch.relu_(h)
    return h, ins


def _hyper_backward(net: nn.Module, ins: list[torch.Tensor], g: torch.Tensor) -> None:
    """Add ``dL/dW = g^T h`` and ``dL/db = sum g`` of every layer of ``net`` to its parameters' ``.grad``."""
    layers = _linears(net)
    for j in range(len(layers) - 1, -1, -1):
        lin, h = layers[j], ins[j]
        add_grad(lin.weight, g.t() @ h)
        add_grad(lin.bias, g.sum(0))
        if j > 0:
            g = torch.ops.aten.threshold_backward(g @ lin.weight, h, 0)


class _ManualMix(torch.autograd.Function):
    """:meth:`QMixer._forward` as one autograd node whose backward is written out (QMIX eq. 5's mixer):

    ``pre = q W1 + b1``, ``h = elu(pre)``, ``out = h w2 + b2`` with ``W1 = |H1(s)|``, ``w2 = |H2(s)|``; backward
    ``dw2 = h^T g``, ``dpre = elu'(pre) (g w2^T)``, ``dW1 = q^T dpre``, ``dq = dpre W1^T``, ``db1 = dpre``,
    ``db2 = g``, through ``abs`` (``sign``) into the hypernetworks. The state gets no gradient (it is data).
    The mixer's parameter gradients are accumulated into their ``.grad`` here, as autograd would.
    """

    @staticmethod
    def forward(ctx: Any, qs: torch.Tensor, state: torch.Tensor, mixer: QMixer) -> torch.Tensor:
        n, e = mixer.n_agents, mixer.embed_dim
        lead = qs.shape[:-1]
        q = qs.reshape(-1, 1, n)
        s = state.reshape(-1, state.shape[-1])
        raw_w1, in_w1 = _hyper_forward(mixer.hyper_w1, s)
        raw_b1, in_b1 = _hyper_forward(mixer.hyper_b1, s)
        raw_w2, in_w2 = _hyper_forward(mixer.hyper_w2, s)
        b2, in_b2 = _hyper_forward(mixer.hyper_b2, s)
        w1 = raw_w1.abs().view(-1, n, e)
        pre = torch.baddbmm(raw_b1.view(-1, 1, e), q, w1)
        hidden = nn.functional.elu(pre)
        w2 = raw_w2.abs().view(-1, e, 1)
        out = torch.baddbmm(b2.view(-1, 1, 1), hidden, w2)
        ctx.mixer = mixer
        ctx.tape = (q, raw_w1, w1, pre, hidden, raw_w2, w2, in_w1, in_b1, in_w2, in_b2)
        ctx.qs_shape = qs.shape
        return out.reshape(lead)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        mixer: QMixer = ctx.mixer
        q, raw_w1, w1, pre, hidden, raw_w2, w2, in_w1, in_b1, in_w2, in_b2 = ctx.tape
        with torch.no_grad():
            g = grad.reshape(-1, 1, 1)
            d_w2 = hidden.transpose(1, 2) * g  # [M, E, 1]
            d_pre = torch.ops.aten.elu_backward(g * w2.transpose(1, 2), 1.0, 1, 1, False, pre)  # [M, 1, E]
            d_w1 = q.transpose(1, 2) * d_pre  # [M, N, E]
            d_q = torch.bmm(d_pre, w1.transpose(1, 2))  # [M, 1, N]
            _hyper_backward(mixer.hyper_w1, in_w1, d_w1.view_as(raw_w1) * raw_w1.sign())
            _hyper_backward(mixer.hyper_b1, in_b1, d_pre.view(d_pre.shape[0], -1))
            _hyper_backward(mixer.hyper_w2, in_w2, d_w2.view_as(raw_w2) * raw_w2.sign())
            _hyper_backward(mixer.hyper_b2, in_b2, g.view(-1, 1))
        return d_q.reshape(ctx.qs_shape), None, None
