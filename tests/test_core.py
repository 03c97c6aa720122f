"""GAE, value normalisation, configs, networks and checkpoints against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from pamarl.buffers.rollout import ValueNorm, gae
from pamarl.checkpoint import load_checkpoint, save_checkpoint
from pamarl.config import TrainConfig, build, parse_overrides, split_keys
from pamarl.errors import CheckpointError, UsageError
from pamarl.nets.mlp import AgentMLP


def test_gae_matches_hand_computation_with_termination():
    r = torch.tensor([1.0, 2.0, 3.0])
    v = torch.tensor([0.5, 0.4, 0.3])
    nv = torch.tensor([0.4, 0.3, 0.2])
    term = torch.tensor([False, False, True])
    adv, ret = gae(r, v, nv, term, term, gamma=0.9, lam=0.8)
    # delta2 = 3 - 0.3 (terminated: no bootstrap); delta1 = 2 + .9*.3 - .4; delta0 = 1 + .9*.4 - .5
    a2 = 2.7
    a1 = 1.87 + 0.72 * a2
    a0 = 0.86 + 0.72 * a1
    assert torch.allclose(adv, torch.tensor([a0, a1, a2]), atol=1e-6)
    assert torch.allclose(ret, adv + v)


def test_gae_bootstraps_truncation_but_not_termination():
    r = torch.tensor([1.0, 1.0])
    v = torch.zeros(2)
    nv = torch.tensor([5.0, 7.0])  # step 0's successor is the final obs of a finished episode
    done = torch.tensor([True, False])
    adv_trunc, _ = gae(r, v, nv, torch.tensor([False, False]), done, gamma=0.9, lam=0.95)
    adv_term, _ = gae(r, v, nv, torch.tensor([True, False]), done, gamma=0.9, lam=0.95)
    assert adv_trunc.tolist() == pytest.approx([1 + 0.9 * 5, 1 + 0.9 * 7])
    assert adv_term.tolist() == pytest.approx([1.0, 1 + 0.9 * 7])


def test_gae_broadcasts_env_flags_over_agents_and_checks_shapes():
    r = torch.ones(4, 2, 3)
    adv, _ = gae(r, torch.zeros_like(r), torch.zeros_like(r), torch.zeros(4, 2, dtype=torch.bool),
                 torch.zeros(4, 2, dtype=torch.bool), 1.0, 1.0)
    assert adv[0].eq(4).all() and adv[3].eq(1).all()
    with pytest.raises(ValueError, match="same shape"):
        gae(r, torch.zeros(4, 2), r, r.bool()[..., 0], r.bool()[..., 0], 0.9, 0.9)


def test_value_norm_hand_computed():
    vn = ValueNorm(1, beta=0.5)
    vn.update(torch.tensor([[2.0], [4.0]]))
    mean, var = vn.stats()
    assert float(mean) == pytest.approx(3.0) and float(var) == pytest.approx(1.0)
    assert float(vn.normalize(torch.tensor([5.0]))) == pytest.approx(2.0)
    vn.update(torch.tensor([[0.0]]))
    mean, var = vn.stats()
    # m = .75, s = 2.5, d = .75 -> mean 1, var 10/3 - 1
    assert float(mean) == pytest.approx(1.0) and float(var) == pytest.approx(10 / 3 - 1)
    x = torch.tensor([0.3, -2.0])
    assert torch.allclose(vn.denormalize(vn.normalize(x)), x, atol=1e-6)


def test_agent_mlp_batched_equals_per_agent_and_isolates_gradients():
    torch.manual_seed(0)
    net = AgentMLP(3, 4, 2, hidden=(8,))
    x = torch.randn(5, 3, 4)
    out = net(x)
    for i in range(3):
        assert torch.allclose(out[:, i], net(x[:, i : i + 1], [i])[:, 0], atol=1e-6)
    assert torch.allclose(net(x[:, [2, 0]], [2, 0]), out[:, [2, 0]], atol=1e-6)
    net(x[:, 1:2], [1]).sum().backward()
    assert all(p.grad is None for p in net.agent_parameters(0) + net.agent_parameters(2))
    assert all(p.grad is not None for p in net.agent_parameters(1))
    with torch.no_grad():  # cached stacks follow in-place parameter updates
        a = net(x)
        net.nets[0].layers[0].weight.add_(1.0)
        b = net(x)
    assert not torch.allclose(a[:, 0], b[:, 0]) and torch.allclose(a[:, 1:], b[:, 1:])


def test_config_overrides_types_and_unknown_keys():
    vals = parse_overrides(["lr=3e-4", "hidden=[64, 64]", "share_params=true", "num_envs=4"])
    from pamarl.algos.mappo import MAPPO

    run_v, algo_v = split_keys(vals, MAPPO.Config)
    assert run_v == {"num_envs": 4}
    cfg = build(MAPPO.Config, algo_v, "mappo")
    assert cfg.lr == 3e-4 and cfg.hidden == (64, 64) and cfg.share_params is True
    with pytest.raises(UsageError, match="'lr'"):
        split_keys({"lrr": 1}, MAPPO.Config)
    with pytest.raises(UsageError, match="expected an integer"):
        build(TrainConfig, {"num_envs": "many"}, "run")
    with pytest.raises(UsageError, match="key=value"):
        parse_overrides(["lr"])


def test_checkpoint_roundtrip_and_corruption(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"x": torch.arange(3), "n": 5, "rng": torch.get_rng_state()})
    data = load_checkpoint(path)
    assert data["n"] == 5 and data["x"].tolist() == [0, 1, 2]
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
