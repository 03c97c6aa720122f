"""The on-policy hot path's faster forms compute what the plain ops compute (issue 15, item 2)."""

from __future__ import annotations

import torch

from pamarl.algos.common import masked_mean, mean_weights
from pamarl.buffers.rollout import rows
from pamarl.nets.mlp import AgentMLP
from pamarl.nets.policy import log_softmax_last


def test_log_softmax_last_equals_log_softmax_with_gradients() -> None:
    torch.manual_seed(0)
    for shape in [(7, 3, 5), (4, 5), (6, 1, 2)]:
        x = torch.randn(shape, requires_grad=True)
        y = torch.randn(shape)
        fast = log_softmax_last(x)
        assert fast.shape == x.shape
        (g_fast,) = torch.autograd.grad((fast * y).sum(), x)
        plain = torch.log_softmax(x, -1)
        (g_plain,) = torch.autograd.grad((plain * y).sum(), x)
        assert torch.allclose(fast, plain, atol=1e-6) and torch.allclose(g_fast, g_plain, atol=1e-6)


def test_mean_weights_give_the_masked_mean() -> None:
    torch.manual_seed(0)
    x = torch.randn(9, 3, dtype=torch.float64)
    mask = (torch.rand(9, 3) > 0.4).float()
    mask[:, 2] = 0  # a column without an active sample: 0, as masked_mean gives
    w = mean_weights(mask, x.dtype)
    assert w.dtype == torch.float64
    assert torch.allclose((x * w).sum(0), masked_mean(x, mask), atol=1e-12)
    assert float((x * w).sum(0)[2]) == 0.0


def test_rows_gathers_like_indexing() -> None:
    x = torch.randn(10, 3, 4)[:, 1:2]  # a strided column view, as an actor phase selects
    idx = torch.tensor([3, 0, 9, 3])
    assert torch.equal(rows(x, idx), x[idx])
    assert rows(x, slice(2, 5)).data_ptr() == x[2:5].data_ptr()  # a slice stays a view


def test_one_network_path_matches_the_batched_one_and_its_cache_follows_the_weights() -> None:
    """One agent's forward (2-D layers, LayerNorm affines folded in) equals the batched product over all agents,
    with and without autograd (the no-grad layers are cached until a parameter changes)."""
    torch.manual_seed(0)
    net = AgentMLP(3, 5, 4, (8, 6), input_norm=True, layer_norm=True)
    for m in net.nets:
        for ln in [m.norm, *m.hidden_norms]:
            torch.nn.init.normal_(ln.weight)
            torch.nn.init.normal_(ln.bias)
    x = torch.randn(16, 3, 5)
    out = net(x)
    one = net(x[:, [1]], [1])
    assert torch.allclose(one, out[:, [1]], atol=1e-6)
    (g_one,) = torch.autograd.grad(one.sum(), net.nets[1].layers[0].weight)
    (g_all,) = torch.autograd.grad(net(x)[:, 1].sum(), net.nets[1].layers[0].weight)
    assert torch.allclose(g_one, g_all, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(net(x[:, [1]], [1]), one, atol=1e-6)
        net.nets[1].hidden_norms[0].bias.add_(0.5)  # in place, as optimisers write: the cache must notice
        moved = net(x[:, [1]], [1])
    assert torch.allclose(moved, net(x[:, [1]], [1]), atol=1e-6)
    assert not torch.allclose(moved, one, atol=1e-3)
