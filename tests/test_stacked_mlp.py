"""AgentMLP(stacked=True): the same networks as the per-parameter AgentMLP, with stacked leaves underneath.

The stacked variant (the off-policy learners' networks) must give the outputs and parameter gradients
of the plain one (up to float rounding: its products run feature-major), keep the parameter names and
checkpoints, and keep per-agent optimisers apart: stepping one agent's optimiser never moves another
agent's weights or Adam moments (HADDPG/HATD3's sequential actor updates rely on it).
"""

from __future__ import annotations

import copy

import pytest
import torch

from pamarl.algos.common import FusedAdam, clip_and_step_together
from pamarl.nets.mlp import AgentMLP


def pair(shared: bool = False, agent_id: bool = False, hidden: tuple[int, ...] = (16, 16)) -> tuple[AgentMLP, AgentMLP]:
    torch.manual_seed(0)
    plain = AgentMLP(3, 7, 4, hidden, shared=shared, agent_id=agent_id)
    torch.manual_seed(0)
    stacked = AgentMLP(3, 7, 4, hidden, shared=shared, agent_id=agent_id, stacked=True)
    return plain, stacked


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("agents", [None, [1], [0, 2], [2, 0]])
def test_same_outputs_and_gradients(shared: bool, agents: list[int] | None) -> None:
    plain, stacked = pair(shared=shared, agent_id=shared)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in stacked.named_parameters()]
    for p, q in zip(plain.parameters(), stacked.parameters()):
        assert torch.equal(p, q)
    x = torch.randn(32, 3 if agents is None else len(agents), 7)
    ya, yb = plain(x, agents), stacked(x, agents)
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-6)
    (ya.pow(2).sum()).backward()
    (yb.pow(2).sum()).backward()
    for (name, p), q in zip(plain.named_parameters(), stacked.parameters()):
        assert (p.grad is None) == (q.grad is None), name  # agents left out get no gradient in either
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_gradients_accumulate_like_autograd() -> None:
    plain, stacked = pair()
    x1, x2 = torch.randn(8, 3, 7), torch.randn(8, 1, 7)
    for m in (plain, stacked):
        m(x1).sum().backward()
        m(x2, [2]).pow(2).sum().backward()  # a second backward before any zero_grad adds to the first
    for p, q in zip(plain.parameters(), stacked.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6)


def test_input_gradient_with_frozen_parameters() -> None:
    """MADDPG/HATD3 actor steps differentiate through a critic whose parameters are switched off."""
    plain, stacked = pair()
    x = torch.randn(16, 3, 7)
    for m in (plain, stacked):
        for p in m.parameters():
            p.requires_grad_(False)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    plain(xa).sum().backward()
    stacked(xb).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in stacked.parameters())
    for p in stacked.parameters():
        p.requires_grad_(True)
    stacked(x).sum().backward()  # switched back on: gradients again
    assert all(p.grad is not None for p in stacked.parameters())


def test_per_agent_optimiser_never_touches_other_agents() -> None:
    _, m = pair()
    opts = [FusedAdam(m.agent_parameters(i), lr=0.1, eps=1e-8) for i in range(3)]
    x = torch.randn(16, 1, 7)
    for _ in range(2):  # two steps: Adam's moments of agent 1 are non-zero before the second
        for i in (1,):
            opts[i].zero_grad(set_to_none=True)
            m(x, [i]).pow(2).sum().backward()
            before = [[p.detach().clone() for p in m.agent_parameters(j)] for j in (0, 2)]
            opts[i].step()
            for j, old in zip((0, 2), before):
                for p, o in zip(m.agent_parameters(j), old):
                    assert torch.equal(p, o)
                    assert p.grad is None
    assert not opts[0].state and not opts[2].state  # untouched optimisers hold no moments
    # The in-place step of agent 1's views moved the stacked weights the forward reads.
    y = m(x, [1])
    torch.manual_seed(0)
    fresh = AgentMLP(3, 7, 4, (16, 16), stacked=True)
    assert not torch.allclose(y, fresh(x, [1]))
    torch.testing.assert_close(m(x, [0]), fresh(x, [0]))


def test_steps_together_match_separate_plain_optimisers() -> None:
    """MADDPG's actors: per-agent clipping, one fused step; same result as the plain networks."""
    plain, stacked = pair()
    x = torch.randn(32, 3, 7)
    for m in (plain, stacked):
        opts = [FusedAdam(m.agent_parameters(i), lr=0.05, eps=1e-8) for i in range(3)]
        for _ in range(3):
            for o in opts:
                o.zero_grad(set_to_none=True)
            m(x).pow(2).sum().backward()
            clip_and_step_together(opts, [m.agent_parameters(i) for i in range(3)], 0.5)
    for p, q in zip(plain.parameters(), stacked.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6)


def test_checkpoints_interchange_with_plain() -> None:
    plain, stacked = pair()
    torch.manual_seed(1)
    other = AgentMLP(3, 7, 4, (16, 16))  # different weights, plain format
    stacked.load_state_dict(other.state_dict())
    x = torch.randn(8, 3, 7)
    with torch.no_grad():
        torch.testing.assert_close(stacked(x), other(x), rtol=1e-5, atol=1e-6)
    plain.load_state_dict(stacked.state_dict())
    assert stacked.state_dict().keys() == plain.state_dict().keys()
    for p, q in zip(plain.parameters(), other.parameters()):
        assert torch.equal(p, q)


def test_copies_are_independent_and_track_in_place_updates() -> None:
    """Target networks: a deep copy has its own stacked weights, Polyak averaging of its parameters moves
    its forward, and the online network is unaffected."""
    _, m = pair()
    target = copy.deepcopy(m)
    for p in target.parameters():
        p.requires_grad_(False)
    x = torch.randn(8, 3, 7)
    with torch.no_grad():
        y0 = m(x)
        torch.testing.assert_close(target(x), y0)
        for p in m.parameters():
            p.add_(0.1)
        torch._foreach_lerp_(list(target.parameters()), list(m.parameters()), 0.5)
        torch.testing.assert_close(m(x), AgentMLP.forward(m, x))
        assert not torch.allclose(target(x), y0)
        torch.testing.assert_close(target.nets[0].layers[0].weight, copy.deepcopy(target).nets[0].layers[0].weight)
    target(x).sum()  # a frozen copy builds no graph
    assert not target(x).requires_grad


def test_stacked_refuses_layer_norm() -> None:
    with pytest.raises(ValueError, match="stacked=True"):
        AgentMLP(2, 3, 1, (4,), layer_norm=True, stacked=True)


def test_dtype_move_and_pickle_rebind() -> None:
    """A dtype or device move and a pickle round trip give the parameters new storage: the stacked
    weights are rebuilt from them, so the forward reads the moved or restored values."""
    import pickle

    plain, stacked = pair()
    x = torch.randn(8, 3, 7, dtype=torch.float64)
    stacked.double()
    plain.double()
    torch.testing.assert_close(stacked(x), plain(x))
    stacked(x).sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float64 for p in stacked.parameters())
    restored = pickle.loads(pickle.dumps(stacked))
    with torch.no_grad():
        torch.testing.assert_close(restored(x), stacked(x))
        for p in restored.parameters():
            p.mul_(0.5)  # in place on the restored parameters: its forward follows, the original does not
        assert not torch.allclose(restored(x), stacked(x))
