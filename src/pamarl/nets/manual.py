"""Hand-written forward and backward of a stacked per-agent relu MLP, without an autograd graph.

An off-policy gradient step on :class:`pamarl.nets.mlp.AgentMLP` (``stacked=True``) is a few hundred
small ops on 256 rows, and autograd's bookkeeping per op (graph nodes, saved-tensor checks, gradient
accumulation into per-agent leaves) costs about as much as the op itself there (``benchmarks/README.md``,
"Third pass"). The maths of a relu MLP's backward is short, so this module does it by hand, in the
feature-major layout :meth:`AgentMLP._forward_stacked` uses (activations ``[k, features, rows]``):

* forward: ``z_j = W_j h_j + b_j`` (one ``baddbmm`` per layer), ``h_{j+1} = relu(z_j)``, keeping the ``h_j``;
* backward, given ``g = dL/dz_last``: per layer from the top, ``dL/dW_j = g h_j^T`` (``bmm``),
  ``dL/db_j = sum_rows g``, and ``g <- relu'(z_{j-1}) * (W_j^T g)`` (``bmm`` and ``threshold_backward``,
  which reads the kept relu output), down to ``dL/dx = W_0^T g`` when the input's gradient is wanted.

The weight gradients land in the agents' parameters' ``.grad`` (views of one stacked gradient, as the
autograd path's hook hands them out), so clipping and the per-agent optimisers work unchanged.
:func:`supports` says which networks qualify (relu, ``stacked=True``); everything else -- and any code
that needs a graph, such as ``torch.autograd.grad`` with respect to parameters -- stays on autograd.
``tests/test_manual_grad.py`` checks losses, gradients and updates against autograd.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pamarl.nets.mlp import AgentMLP, add_grad


def supports(mlp: AgentMLP) -> bool:
    """Whether :func:`forward` / :func:`backward` can stand in for autograd on ``mlp``."""
    return bool(mlp.stacked and mlp.act is nn.functional.relu and not (mlp.input_norm or mlp.layer_norm))


@dataclass
class Tape:
    """What :func:`backward` needs from a :func:`forward`: the layer inputs and the weights used."""

    mlp: AgentMLP
    nets: list[int]
    """The networks that ran, in input order (``[0]`` for a shared network)."""
    weights: list[torch.Tensor]
    """Per layer ``W [k, out, in]`` as used."""
    acts: list[torch.Tensor]
    """Per layer its input ``h_j [k, in, rows]`` (``h_0`` the network input; later ones relu outputs)."""
    shape: tuple[int, int]
    """``(B, k)`` of the input ``[B, k, in]``."""
    in_dim: int
    """Input width before the agent id (the part whose gradient :func:`backward` returns)."""


@torch.no_grad()
def forward(mlp: AgentMLP, x: torch.Tensor, agents: Sequence[int] | None = None) -> tuple[torch.Tensor, Tape]:
    """``mlp(x, agents)`` for ``x [B, k, in]`` -> ``([B, k, out], tape)``, no graph (equal to the autograd path)."""
    idx = list(range(mlp.n_agents)) if agents is None else list(agents)
    B, k, in_dim = x.shape
    if k != len(idx):
        raise ValueError(f"AgentMLP: input has {k} agents but {len(idx)} were selected")
    if mlp.agent_id:
        eye = torch.eye(mlp.n_agents, dtype=x.dtype, device=x.device)[idx]
        x = torch.cat([x, eye.expand(B, k, mlp.n_agents)], -1)
    leaves = mlp._bound_leaves()
    if mlp.shared or k == 1:  # one network over all rows
        nets = [0 if mlp.shared else idx[0]]
        layers = [(wv[nets[0]].unsqueeze(0), bv[nets[0]].unsqueeze(0)) for (_, wv), (_, bv) in leaves]
        h = x.reshape(1, B * k, -1).transpose(1, 2)  # [1, in, B k]
    else:
        nets = idx
        whole = nets == list(range(len(mlp.nets)))
        layers = [(w, b) if whole else (w[nets], b[nets]) for (w, _), (b, _) in leaves]
        h = x.permute(1, 2, 0)  # [k, in, B]
    acts = [h]
    last = len(layers) - 1
    for j, (w, b) in enumerate(layers):
        h = torch.baddbmm(b.unsqueeze(-1), w, h)
        if j < last:
            h = torch.relu_(h)
            acts.append(h)
    out = h.transpose(1, 2).reshape(B, k, -1) if len(nets) == 1 and k > 1 else h.permute(2, 0, 1)
    return out, Tape(mlp, nets, [w for w, _ in layers], acts, (B, k), in_dim)


@torch.no_grad()
def backward(tape: Tape, grad_out: torch.Tensor, input_grad: bool = False, param_grad: bool = True,
             input_cols: torch.Tensor | None = None, rows: int | None = None) -> torch.Tensor | None:
    """Backpropagate ``grad_out = dL/d out [B, k, out]`` through the network of ``tape``.

    With ``param_grad``, adds ``dL/dW`` and ``dL/db`` to the ``.grad`` of the parameters of the networks
    that ran (those with ``requires_grad``), as autograd's accumulation would. With ``input_grad``, returns
    ``dL/dx [B, k, in]`` (without the agent-id columns); otherwise ``None``. ``input_cols`` (long ``[k, m]``,
    with ``input_grad``): only those input columns of each network, ``[B, k, m]`` -- an actor step needs the
    gradient at one agent's action, a few of the critic's input columns, and this skips the product for the
    rest. ``rows``: ``grad_out`` covers only the first ``rows`` samples of the forward's batch, the others
    having zero gradient (QMIX's online values of the successors, which only pick the double-Q action), so
    their share of the products, zero, is skipped.
    """
    B, k = tape.shape
    acts = tape.acts
    if rows is not None and rows != B:  # samples are the last axis in both layouts (b-major rows of one net)
        B = rows
        acts = [h[..., :rows * (k if len(tape.nets) == 1 else 1)] for h in acts]
    if len(tape.nets) == 1 and k > 1:
        g = grad_out.reshape(1, B * k, -1).transpose(1, 2)  # [1, out, B k]
    else:
        g = grad_out.permute(1, 2, 0)  # [k, out, B]
    leaves = tape.mlp._bound_leaves() if param_grad else []
    for j in range(len(tape.weights) - 1, -1, -1):
        h = acts[j]
        if param_grad:
            _accumulate(leaves[j][0][1], tape.nets, torch.bmm(g, h.transpose(1, 2)))
            _accumulate(leaves[j][1][1], tape.nets, g.sum(-1))
        w = tape.weights[j]
        if j > 0:
            # W^T g; for a one-output layer an outer product, which a broadcast multiply does faster than gemm.
            back = w.transpose(1, 2) * g if w.shape[1] == 1 else torch.bmm(w.transpose(1, 2), g)
            g = torch.ops.aten.threshold_backward(back, h, 0)  # relu': where the kept output h is > 0
        elif input_grad:
            one_net = len(tape.nets) == 1 and k > 1  # one shared network over the rows of all k inputs
            if input_cols is None or one_net:
                w = w[:, :, :tape.in_dim]
            else:
                w = w.gather(2, input_cols.unsqueeze(1).expand(-1, w.shape[1], -1))
            dx = torch.bmm(w.transpose(1, 2), g)  # [k or 1, in, rows]
            if not one_net:
                return dx.permute(2, 0, 1)
            dx = dx.transpose(1, 2).reshape(B, k, -1)
            return dx if input_cols is None else dx.gather(2, input_cols.unsqueeze(0).expand(B, -1, -1))
    return None


def _accumulate(params: list[nn.Parameter], nets: list[int], grad: torch.Tensor) -> None:
    """Give network ``nets[i]``'s parameter ``grad[i]`` (a view), or add it to the gradient it holds."""
    for part, i in zip(grad.unbind(0), nets):
        add_grad(params[i], part)
