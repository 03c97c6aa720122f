"""Replay memories: layout, ring wrap-around, successors from ``final``, episodes, checkpoint round trip."""

from __future__ import annotations

import io

import pytest
import torch

from pamarl.buffers.replay import EpisodeReplay, ReplayBuffer
from pamarl.envs.base import BatchObs, BatchStep, EnvSpec

N, E, OB, A, S = 2, 3, 4, 3, 5


def spec(discrete: bool = True, limit: int | None = None) -> EnvSpec:
    bounds = None if discrete else ((-1.0,) * A,) * N
    return EnvSpec(agent_ids=("a", "b"), obs_dims=(OB, OB), state_dim=S, action_kind="discrete" if discrete else
                   "continuous", action_dims=(A, A), episode_limit=limit, action_low=bounds,
                   action_high=None if bounds is None else ((1.0,) * A,) * N)


def obs_at(v: float) -> BatchObs:
    """Observations whose every entry encodes ``v`` (plus the env index / 100)."""
    base = v + torch.arange(E, dtype=torch.float32)[:, None] / 100
    return BatchObs(obs=base[:, :, None].expand(E, N, OB).clone(), state=base.expand(E, S).clone(),
                    action_mask=torch.ones(E, N, A, dtype=torch.bool), active=torch.ones(E, N, dtype=torch.bool),
                    first=torch.zeros(E, dtype=torch.bool))


def make_step(v: float, final: float | None = None, term: list[bool] | None = None,
              trunc: list[bool] | None = None) -> BatchStep:
    """A vector step whose ``final`` is ``final`` where an episode ended (term/trunc), else ``next``."""
    nxt = obs_at(v)
    terminated, truncated = torch.tensor(term or [False] * E), torch.tensor(trunc or [False] * E)
    fin = nxt
    if final is not None:
        f, ended = obs_at(final), terminated | truncated
        fin = BatchObs(*(torch.where(ended.view(-1, *[1] * (getattr(nxt, k).dim() - 1)), getattr(f, k), getattr(nxt, k))
                         for k in ("obs", "state", "action_mask", "active", "first")))
    return BatchStep(next=nxt, final=fin, reward=torch.full((E, N), v), cost=None, terminated=terminated,
                     truncated=truncated)


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_transitions_store_final_as_successor_and_terminated_only() -> None:
    rb = ReplayBuffer(spec(), capacity=10)
    # Env 0 is truncated (final 9 differs from the reset obs 2), env 1 terminated, env 2 goes on.
    rb.add(obs_at(1.0), torch.zeros(E, N, dtype=torch.long),
           make_step(2.0, final=9.0, term=[False, True, False], trunc=[True, False, False]))
    assert len(rb) == E
    d = rb.data
    assert torch.allclose(d["next_obs"][0, 0, 0], torch.tensor(9.0))  # the true last obs, not the reset one
    assert d["terminated"][:E].tolist() == [0.0, 1.0, 0.0]  # truncation keeps the bootstrap
    assert torch.allclose(d["obs"][:E, 0, 0], torch.tensor([1.0, 1.01, 1.02]))


def test_ring_wraps_and_sampling_shapes() -> None:
    rb = ReplayBuffer(spec(discrete=False), capacity=7)
    for t in range(4):  # 12 rows into 7 slots
        rb.add(obs_at(float(t)), torch.full((E, N, A), float(t)), make_step(t + 1.0))
    assert len(rb) == 7 and rb.ptr == 12 % 7
    # The oldest surviving rows are from t = 2 (rows 6, 7, 8 -> slots 6, 0, 1) and t = 3.
    assert sorted(rb.data["obs"][:, 0, 0].floor().tolist()) == [1.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0]
    g = torch.Generator().manual_seed(0)
    b = rb.sample(16, g)
    assert b.obs.shape == (16, N, OB) and b.action.shape == (16, N, A) and b.state.shape == (16, S)
    assert b.next_action_mask.dtype == torch.bool and b.terminated.shape == (16,)
    # every sampled successor is the step after its observation
    assert torch.allclose(b.next_obs[:, 0, 0].floor(), b.obs[:, 0, 0].floor() + 1)


def test_n_step_returns_follow_each_env_stream_and_stop_at_episode_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    rb = ReplayBuffer(spec(), capacity=30)
    a = torch.zeros(E, N, dtype=torch.long)
    # rewards r_t = t + 1 in every env; env 1 terminates after step 1, env 2 is truncated after step 2
    ends = {1: ([False, True, False], [False] * E), 2: ([False] * E, [False, False, True])}
    for t in range(5):
        term, trunc = ends.get(t, ([False] * E, [False] * E))
        rb.add(obs_at(float(t)), a, make_step(float(t + 1), final=100.0 + t, term=term, trunc=trunc))
    g = 0.5
    # sample every row once, in order: patch the index draw
    monkeypatch.setattr(torch, "randint", lambda *args, **kw: torch.arange(15))
    b = rb.sample(15, torch.Generator(), n_step=3, gamma=g)
    R, disc, nxt, ended = b.reward[:, 0], b.discount, b.next_obs[:, 0, 0], b.terminated
    # env 0 at t = 0: 1 + 0.5 * 2 + 0.25 * 3, bootstrapping from the successor of t = 2 with 0.5^3
    assert R[0] == pytest.approx(2.75) and disc[0] == pytest.approx(0.125) and nxt[0] == pytest.approx(3.0)
    # env 1 at t = 0: its episode terminates after t = 1: 1 + 0.5 * 2, no bootstrap (terminated)
    assert R[1] == pytest.approx(2.0) and disc[1] == pytest.approx(0.25) and ended[1] == 1.0
    # env 2 at t = 1: truncated after t = 2: 2 + 0.5 * 3, bootstrapping from the final obs 102.02
    assert R[3 + 2] == pytest.approx(3.5) and ended[5] == 0.0 and nxt[5] == pytest.approx(102.02)
    # env 0 at t = 3: only t = 4 is newer: 4 + 0.5 * 5 with 0.5^2
    assert R[9] == pytest.approx(6.5) and disc[9] == pytest.approx(0.25) and nxt[9] == pytest.approx(5.0)
    # the newest rows stand alone; a cut (the runner reset the envs) stops returns like an episode end
    assert R[12] == pytest.approx(5.0) and disc[12] == pytest.approx(0.5)
    rb.add(obs_at(5.0), a, make_step(6.0))
    rb.cut()
    rb.add(obs_at(0.0), a, make_step(1.0))
    monkeypatch.setattr(torch, "randint", lambda *args, **kw: torch.tensor([12]))
    b = rb.sample(1, torch.Generator(), n_step=3, gamma=g)
    assert b.reward[0, 0] == pytest.approx(5.0 + 0.5 * 6.0) and b.next_obs[0, 0, 0] == pytest.approx(6.0)


def test_replay_state_dict_roundtrip_weights_only() -> None:
    rb = ReplayBuffer(spec(), capacity=8)
    for t in range(2):
        rb.add(obs_at(float(t)), torch.ones(E, N, dtype=torch.long), make_step(t + 1.0))
    rb2 = ReplayBuffer(spec(), capacity=8)
    rb2.load_state_dict(roundtrip(rb.state_dict()))
    assert rb2.ptr == rb.ptr and len(rb2) == len(rb)
    for k in rb.data:
        assert torch.equal(rb.data[k], rb2.data[k]), k
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(spec(), capacity=9).load_state_dict(rb.state_dict())


def test_episode_replay_commits_pads_and_chunks() -> None:
    er = EpisodeReplay(spec(), capacity=10, max_len=4, num_envs=E)
    a = torch.zeros(E, N, dtype=torch.long)
    # Env 0 terminates after 2 steps; env 1 is truncated after 3; env 2 runs 4 steps and is cut at max_len.
    plan = {1: ([True, False, False], [False, False, False]), 2: ([False, False, False], [False, True, False])}
    for t in range(4):
        term, trunc = plan.get(t, ([False] * E, [False] * E))
        er.add(obs_at(float(t)), a, make_step(t + 1.0, final=50.0 + t, term=list(term), trunc=list(trunc)))
    assert len(er) == 3
    d = er.data
    lengths = d["filled"][:3].sum(1).tolist()
    assert sorted(lengths) == [2.0, 3.0, 4.0]
    row0 = lengths.index(2.0)  # env 0's episode
    assert d["terminated"][row0].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert torch.allclose(d["obs"][row0, :3, 0, 0], torch.tensor([0.0, 1.0, 51.0]))  # successor = final
    row2 = lengths.index(4.0)
    assert d["terminated"][row2].sum() == 0  # a cut chunk bootstraps
    assert torch.allclose(d["obs"][row2, 4, 0, 0], torch.tensor(4.02))  # the next obs (no episode end)
    g = torch.Generator().manual_seed(1)
    b = er.sample(5, g)
    T = b.filled.shape[1]
    assert b.obs.shape == (5, T + 1, N, OB) and b.action.shape == (5, T, N) and b.reward.shape == (5, T, N)


def test_episode_replay_flush_and_roundtrip() -> None:
    er = EpisodeReplay(spec(), capacity=4, max_len=10, num_envs=E)
    a = torch.zeros(E, N, dtype=torch.long)
    for t in range(3):
        er.add(obs_at(float(t)), a, make_step(t + 1.0))
    assert len(er) == 0 and er.t.tolist() == [3, 3, 3]
    state = roundtrip(er.state_dict())
    er.flush()  # the runner reset the envs: running episodes are cut (and bootstrap)
    assert len(er) == 3 and er.t.tolist() == [0, 0, 0]
    assert torch.allclose(er.data["obs"][:3, 3, 0, 0].floor(), torch.full((3,), 3.0))
    er2 = EpisodeReplay(spec(), capacity=4, max_len=10, num_envs=E)
    er2.load_state_dict(state)
    er2.flush()
    for k in er.data:
        assert torch.equal(er.data[k], er2.data[k]), k
    er.add(obs_at(0.0), a, make_step(1.0))
    er.add(obs_at(1.0), a, make_step(2.0, term=[True] * E))
    assert len(er) == 4 and er.ptr == (3 + 3) % 4  # ring of episodes wrapped
