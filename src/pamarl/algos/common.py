"""Small pieces both algorithm families share: masked means, the finite check, one optimiser step.

Kept here once so that on- and off-policy learners cannot drift apart in how they average over
active agents, report a NaN, or clip gradients.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
from torch import nn

from pamarl.errors import TrainingError


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-agent mean over the batch: ``[B, k]`` -> ``[k]``, counting only active samples.

    ``mask`` (0/1, same shape as ``x``) selects the samples; a column with no active sample gives 0.
    """
    return (x * mask).sum(0) / mask.sum(0).clamp_min(1.0)


def check_finite(loss: torch.Tensor, what: str) -> None:
    """Stop training with a :class:`TrainingError` naming ``what`` when ``loss`` holds NaN or inf."""
    if not torch.isfinite(loss).all():
        raise TrainingError(
            f"{what} became NaN/inf. Lower the learning rates or the gradient clipping: resume from the last "
            "checkpoint with `pamarl train --resume RUN_DIR lr=... critic_lr=... max_grad_norm=...` (the change "
            "is recorded in RUN_DIR/config_history.yaml), or start over with them."
        )


def clip_and_step(opt: torch.optim.Optimizer, params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the gradient norm of ``params`` to ``max_norm`` (0: no clipping) and step ``opt``.

    Returns the gradient norm before clipping (a 0-d tensor; no host sync).
    """
    ps = [p for p in params if p.grad is not None]
    if max_norm > 0:
        norm = nn.utils.clip_grad_norm_(ps, max_norm, foreach=True)
    elif ps:
        norm = torch.linalg.vector_norm(torch.stack([cast(torch.Tensor, p.grad).norm() for p in ps]))
    else:
        norm = torch.zeros(())
    opt.step()
    return norm.detach()


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params: Iterable[nn.Parameter],
                   max_norm: float, what: str) -> torch.Tensor:
    """Check ``loss`` is finite, backpropagate it, clip and step ``opt``; returns the gradient norm."""
    check_finite(loss, what)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    return clip_and_step(opt, params, max_norm)


def adam(params: Iterable[nn.Parameter], lr: float, eps: float) -> torch.optim.Optimizer:
    """Adam with the multi-tensor (``foreach``) implementation, which torch picks by default only on CUDA:
    on a CPU the per-tensor loop costs more than the arithmetic for pamarl's small networks. Not
    ``fused=True``, although it is faster still: fused steps do not bump the parameters' version
    counters, which AgentMLP's cache of stacked weights relies on to notice that the weights changed."""
    return torch.optim.Adam(list(params), lr=lr, eps=eps, foreach=True)
