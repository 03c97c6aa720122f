"""Small pieces both algorithm families share: masked means, the finite check, one optimiser step.

Kept here once so that on- and off-policy learners cannot drift apart in how they average over
active agents, report a NaN, or clip gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import nn
from torch.optim.adam import adam as adam_functional

from pamarl.errors import TrainingError


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-agent mean over the batch: ``[B, k]`` -> ``[k]``, counting only active samples.

    ``mask`` (0/1, same shape as ``x``) selects the samples; a column with no active sample gives 0.
    """
    return (x * mask).sum(0) / mask.sum(0).clamp_min(1.0)


def mean_weights(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, k]`` weights ``w`` with ``(x * w).sum(0) == masked_mean(x, mask)`` (to rounding) for ``x`` of ``dtype``.

    For several means over one minibatch (an actor step takes four): two ops per mean instead of five. The
    weights are computed in ``dtype`` (a float32 mask would round them for float64 networks).
    """
    m = mask.to(dtype)
    return m / m.sum(0).clamp_min(1.0)


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
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        # clip_grad_norm_'s arithmetic (foreach norms, their norm, coefficient max_norm / (norm + 1e-6)
        # clamped at 1), without its grouping by device and dtype, which cost more than the arithmetic
        # (about 50 us per call on the off-policy learners' small networks).
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        if max_norm > 0:
            torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))
    else:
        norm = torch.zeros(())
    opt.step()
    return norm.detach()


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params: Iterable[nn.Parameter],
                   max_norm: float, what: str, backward: Callable[[], object] | None = None) -> torch.Tensor:
    """Check ``loss`` is finite, backpropagate it, clip and step ``opt``; returns the gradient norm.

    ``backward``: what fills the gradients instead of ``loss.backward()`` (a hand-written backward,
    :mod:`pamarl.nets.manual`); ``loss`` is then only checked."""
    check_finite(loss, what)
    opt.zero_grad(set_to_none=True)
    if backward is None:
        loss.backward()
    else:
        backward()
    return clip_and_step(opt, params, max_norm)


def adam(params: Iterable[nn.Parameter], lr: float, eps: float) -> torch.optim.Optimizer:
    """Adam with the multi-tensor (``foreach``) implementation, which torch picks by default only on CUDA:
    on a CPU the per-tensor loop costs more than the arithmetic for pamarl's small networks. Not
    ``fused=True``, although it is faster still: fused steps do not bump the parameters' version
    counters, which AgentMLP's cache of stacked weights relies on to notice that the weights changed
    (:class:`FusedAdam` bumps them itself; the on- and off-policy learners use it)."""
    return torch.optim.Adam(list(params), lr=lr, eps=eps, foreach=True)


class FusedAdam(torch.optim.Adam):
    """Adam with torch's fused kernel (one call per step for all parameters), which also bumps the
    parameters' version counters.

    The learners step several small optimisers per gradient step; the ``foreach`` path on a
    CPU loops over the tensors in C++ with about ten ops each plus a host read of every ``step``
    counter, which cost more than a third of a MADDPG gradient step (profiled, simple_spread, batch
    256). The fused kernel does the same arithmetic (results differ from ``foreach`` in the last bit of
    about 0.1% of the weights), but it writes the parameters without bumping their version counters,
    which :class:`pamarl.nets.mlp.AgentMLP`'s cache of stacked weights relies on; :meth:`step` bumps
    them itself. The optimiser's state has the format of a plain Adam's: a checkpoint written with
    ``foreach`` loads, and keeps using the fused kernel (:meth:`load_state_dict`).
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float, eps: float):
        super().__init__(list(params), lr=lr, eps=eps, fused=True)

    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        if closure is None and len(self.param_groups) == 1:  # the learners' case: _step_together's lean step
            _step_together([self])
            return None
        loss = super().step(closure)
        torch.autograd.graph.increment_version(
            [p for g in self.param_groups for p in g["params"] if p.grad is not None])
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``Optimizer.zero_grad``: the learners' ``set_to_none=True`` case as a plain loop, without the
        profiler record and per-device grouping around it (12 us against 2 us a call for 6 parameters, measured;
        four calls per MADDPG step)."""
        if not set_to_none:
            super().zero_grad(False)
            return
        for g in self.param_groups:
            for p in g["params"]:
                p.grad = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for g in self.param_groups:  # a saved group brings its own flags: keep this optimiser fused
            g["fused"], g["foreach"] = True, None


def fused_adam(params: Iterable[nn.Parameter], lr: float, eps: float) -> torch.optim.Optimizer:
    """:class:`FusedAdam` (the on- and off-policy learners' optimiser; see there why not :func:`adam`). On the
    on-policy side it makes a HAPPO update 6% faster on mpe-torch (128 x 50, 4 minibatches, measured)."""
    return FusedAdam(params, lr, eps)


def clip_and_step_together(opts: list[torch.optim.Optimizer], params: list[list[nn.Parameter]],
                           max_norm: float) -> torch.Tensor:
    """For agents that all step at once (MADDPG's actors): clip the gradient norm of each ``params[i]``
    to ``max_norm`` separately (0: no clipping), then step every optimiser ``opts[i]`` (each over
    ``params[i]``) -- the same maths as :func:`clip_and_step` per agent, in a few calls.

    Adam is elementwise, so one fused kernel over the union of the agents' parameters, each with its
    own moments and step count, updates every agent exactly as its own optimiser would; separate
    optimisers stay in the checkpoints and for the HA family's one-agent-at-a-time steps. With
    :class:`FusedAdam`s of equal hyperparameters the whole step is one kernel call; otherwise each
    optimiser steps on its own. Returns the per-agent gradient norms before clipping, ``[len(params)]``.
    """
    lists = [[p for p in ps if p.grad is not None] for ps in params]
    grads = [cast(torch.Tensor, p.grad) for ps in lists for p in ps]
    counts = [len(ps) for ps in lists]
    if not grads:
        return torch.zeros(len(params))
    sq = torch.stack(torch._foreach_norm(grads)).square()
    if len(set(counts)) == 1:  # the usual case: identical networks, one reshape instead of k sums
        norms = sq.view(len(counts), -1).sum(1).sqrt()
    else:
        norms = torch.stack([s.sum() for s in sq.split(counts)]).sqrt()
    if max_norm > 0:  # clip_grad_norm_'s coefficient, per agent
        coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, list(coef.repeat_interleave(torch.tensor(counts)).unbind()))
    _step_together(opts)
    return norms.detach()


def _step_together(opts: list[torch.optim.Optimizer]) -> None:
    """Step ``opts``: one fused Adam kernel call when they are :class:`FusedAdam`s of one configuration."""
    groups = [g for o in opts for g in o.param_groups]
    keys = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay")
    if not all(isinstance(o, FusedAdam) for o in opts) or any(
            any(g[k] != groups[0][k] for k in keys) for g in groups):
        for o in opts:
            o.step()
        return
    ps: list[torch.Tensor] = []
    grads: list[torch.Tensor] = []
    avgs: list[torch.Tensor] = []
    sqs: list[torch.Tensor] = []
    max_sqs: list[torch.Tensor] = []
    steps: list[torch.Tensor] = []
    has_complex = False
    for o in opts:
        for g in o.param_groups:
            # Adam's own lazy state initialisation and gathering, so the state is exactly what o.step() keeps.
            has_complex |= cast(FusedAdam, o)._init_group(g, ps, grads, avgs, sqs, max_sqs, steps)
    g0 = groups[0]
    with torch.no_grad():
        if ps and not has_complex and not g0["maximize"] and len({(p.device, p.dtype) for p in ps}) == 1:
            # What torch.optim.adam's fused path runs for one device and dtype (step counts + 1, then the
            # kernel), without its regrouping of the lists by device and dtype, which cost more than the
            # kernel on these networks (about 50 us a call).
            torch._foreach_add_(steps, 1)
            kernel = torch._fused_adamw_ if g0["decoupled_weight_decay"] else torch._fused_adam_
            kernel(ps, grads, avgs, sqs, max_sqs, steps, amsgrad=g0["amsgrad"], lr=g0["lr"], beta1=g0["betas"][0],
                   beta2=g0["betas"][1], weight_decay=g0["weight_decay"], eps=g0["eps"], maximize=False,
                   grad_scale=None, found_inf=None)
        else:
            adam_functional(ps, grads, avgs, sqs, max_sqs, steps, amsgrad=g0["amsgrad"], has_complex=has_complex,
                            beta1=g0["betas"][0], beta2=g0["betas"][1], lr=g0["lr"], weight_decay=g0["weight_decay"],
                            eps=g0["eps"], maximize=g0["maximize"], foreach=None, capturable=False,
                            differentiable=False, fused=True, decoupled_weight_decay=g0["decoupled_weight_decay"])
    torch.autograd.graph.increment_version(ps)
