"""The parameter-averaging DQN (``dqn_avg``) on its in-process backend: the averaging maths against hand
values, N = 1 is IQL, every learner holds the average after a sync, exact resume, asynchronous averaging
with bounded staleness, action masks, and learning on a small game. Its Ray backend is in test_ray.py."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import update_crashes_at

from pamarl.algos.dqn_avg import DQNAvg, DQNAvgConfig, average_params, divergence
from pamarl.algos.value_based import ValueConfig
from pamarl.config import TrainConfig, build
from pamarl.distributed.pool import LocalPool
from pamarl.errors import UsageError
from pamarl.runner import train


def rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if k not in ("wall_s", "time/sync_s", "time/sync_share")}
                for r in csv.DictReader(f)]


def quick(tmp_path: Path, name: str, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(algo="dqn_avg", env="mpe/simple_spread_v3", progress=False, tensorboard=False,
                                eval_every=0, run_dir=str(tmp_path / name), num_envs=2, rollout_len=25, steps=400,
                                eval_episodes=2)
    base.update(kw)
    return TrainConfig(**base)


SMALL: dict[str, Any] = dict(hidden=(16,), batch_size=16, learning_starts=100, env_steps_per_update=5)


def test_average_and_divergence_match_hand_values() -> None:
    def p(w: float, m: float) -> dict[str, Any]:
        return {"nets": {"qnet": {"w": torch.tensor([w, 0.0]), "n": torch.tensor(3)},
                         "target_qnet": {"w": torch.tensor([2 * w])}},
                "opt": {"state": {0: {"exp_avg": torch.tensor([m]), "step": torch.tensor(4.0)}}, "param_groups": []}}

    ps = [p(1.0, 0.0), p(3.0, 2.0)]
    avg = average_params(ps, "average")
    assert torch.equal(avg["nets"]["qnet"]["w"], torch.tensor([2.0, 0.0]))
    assert avg["nets"]["qnet"]["n"] == 3  # integer buffers are kept, not averaged
    assert torch.equal(avg["nets"]["target_qnet"]["w"], torch.tensor([4.0]))
    assert avg["opt"]["state"][0]["exp_avg"] == 1.0 and avg["opt"]["state"][0]["step"] == 4.0
    assert "opt" not in average_params(ps, "reset")
    # ||(1,0) - (2,0)|| / ||(2,0)|| = 0.5 for both learners.
    assert divergence(ps, avg) == pytest.approx(0.5)


def test_config_is_checked() -> None:
    with pytest.raises(UsageError, match="sync_mode"):
        build(DQNAvgConfig, {"sync_mode": "sometimes"}, "dqn_avg")
    with pytest.raises(UsageError, match="learner_eps"):
        build(DQNAvgConfig, {"n_learners": 3, "learner_eps": [0.1, 0.2]}, "dqn_avg")
    with pytest.raises(UsageError, match="n_learners"):
        build(DQNAvgConfig, {"n_learners": 0}, "dqn_avg")


def test_one_learner_is_iql(tmp_path: Path) -> None:
    """With N = 1 there is nothing to average: the same numbers as IQL with the same config."""
    iql = train(quick(tmp_path, "iql", algo="iql"), ValueConfig(**SMALL))
    avg = train(quick(tmp_path, "avg"), DQNAvgConfig(n_learners=1, **SMALL))
    keys = ["train/return_mean", "loss/td", "train/q_taken", "train/epsilon", "train/updates"]
    assert [[r[k] for k in keys] for r in rows(iql.run_dir)] == [[r[k] for k in keys] for r in rows(avg.run_dir)]


def _algo(tmp_path: Path, **cfg: Any) -> tuple[DQNAvg, TrainConfig]:
    from pamarl.envs.registry import make_env

    run = quick(tmp_path, "direct")
    env = make_env(run.env, num_envs=run.num_envs, seed=run.seed)
    spec = env.spec
    env.close()
    return DQNAvg(spec, DQNAvgConfig(**{**SMALL, **cfg}), run, torch.device("cpu")), run


def test_learners_start_equal_diverge_and_are_averaged(tmp_path: Path) -> None:
    from pamarl.algos.base import Progress
    from pamarl.envs.registry import make_env

    algo, run = _algo(tmp_path, n_learners=3, sync_every=10, learner_eps=(0.05, 0.2, 0.5), eps_anneal_steps=0)
    assert isinstance(algo.pool, LocalPool)
    workers = algo.pool.workers

    def flat(learner: Any) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in learner.algo.qnet.parameters()])

    assert all(torch.equal(flat(algo.local), flat(w)) for w in workers)  # theta_i = theta_0
    assert [w.algo.epsilon() for w in workers] == [0.2, 0.5]  # epsilon per learner
    env = make_env(run.env, num_envs=run.num_envs, seed=1)
    obs = env.reset(seed=1)
    seen: list[dict[str, Any]] = []
    for it in range(8):  # 50 env steps per learner and iteration: 10 gradient steps each once learning
        for _ in range(run.rollout_len):
            out = algo.act(obs)
            st = env.step(out.env_action)
            algo.observe(obs, out, st)
            obs = st.next
        if it == 4:  # a learner's own iteration, before the average: it has moved away from learner 0
            assert not torch.equal(flat(algo.local), flat(workers[0]))
        seen.append(algo.update(Progress(it, 8, 0)))
    env.close()
    synced = [m for m in seen if "avg/divergence" in m]
    # learning starts with the 2nd iteration's last step: 10 gradient steps (one average) in each of iterations 3-8
    assert len(synced) == 6 and all(m["avg/learners_averaged"] == 3 for m in synced)
    assert all(float(m["avg/divergence"]) > 0 for m in synced)
    assert all(torch.equal(flat(algo.local), flat(w)) for w in workers)  # every learner holds the average
    tgt = [torch.cat([p.reshape(-1) for p in x.algo.target_qnet.parameters()]) for x in (algo.local, *workers)]
    assert all(torch.equal(tgt[0], t) for t in tgt[1:])
    assert seen[-1]["train/env_steps_total"] == 3 * 8 * 50
    assert all(f"avg/return_l{i}" in seen[-1] for i in range(3))


def test_resume_matches_uninterrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = DQNAvgConfig(n_learners=2, sync_every=15, **SMALL)
    kw: dict[str, Any] = dict(steps=600, checkpoint_every=4, eval_every=4)
    full = train(quick(tmp_path, "full", **kw), cfg)

    # The run dies after the checkpoint at iteration 4.
    with update_crashes_at(monkeypatch, DQNAvg, 6), pytest.raises(KeyboardInterrupt):
        train(quick(tmp_path, "cut", **kw), cfg)
    train(quick(tmp_path, "cut", **kw), resume=True)
    assert rows(full.run_dir) == rows(tmp_path / "cut")


class SlowPool(LocalPool):
    """Worker 0's iterations take two polls to finish (as a slow remote learner would)."""

    def submit(self, i: int, method: str, *args: Any) -> Any:
        f = super().submit(i, method, *args)
        f.polls = 2 if (i == 0 and method == "iterate") else 0
        return f

    def ready(self, futures: Any, timeout: float | None = 0.0) -> list[Any]:
        out = []
        for f in futures:
            if f.polls <= 0 or timeout is None:
                out.append(f)
            f.polls -= 1
        return out


def test_async_averages_whoever_reported_with_bounded_staleness(tmp_path: Path) -> None:
    from pamarl.algos.base import Progress
    from pamarl.envs.registry import make_env

    algo, run = _algo(tmp_path, n_learners=3, sync_every=1, sync_mode="async", max_staleness=2, learning_starts=50)
    assert algo.pool is not None
    algo.pool.__class__ = SlowPool
    env = make_env(run.env, num_envs=run.num_envs, seed=1)
    obs = env.reset(seed=1)
    seen = []
    for it in range(6):
        for _ in range(run.rollout_len):
            out = algo.act(obs)
            st = env.step(out.env_action)
            algo.observe(obs, out, st)
            obs = st.next
        seen.append(algo.update(Progress(it, 6, 0)))
    env.close()
    averaged = [m["avg/learners_averaged"] for m in seen if "avg/divergence" in m]
    # The slow learner misses averages but never more than max_staleness - 1 in a row before it is waited for.
    assert 2.0 in averaged and 3.0 in averaged
    assert max(m["avg/staleness_max"] for m in seen) <= 1


@pytest.mark.parametrize("task", ["matrix/penalty?steps=2", "mpe/simple_speaker_listener_v4"])
def test_runs_on_discrete_families_with_masks(tmp_path: Path, task: str) -> None:
    """speaker_listener pads the speaker's and listener's actions to one width with masks."""
    res = train(quick(tmp_path, "m", env=task, steps=300), DQNAvgConfig(n_learners=2, sync_every=5, **SMALL))
    last = rows(res.run_dir)[-1]
    assert float(last["avg/averages"]) > 0 and float(last["loss/td"]) >= 0


def test_refuses_continuous_actions() -> None:
    from pamarl.envs.registry import make_env

    env = make_env("mpe/simple_spread_v3?continuous=true", num_envs=1, seed=0)
    with pytest.raises(UsageError, match="discrete"):
        DQNAvg(env.spec, DQNAvgConfig(), TrainConfig(algo="dqn_avg"), torch.device("cpu"))
    env.close()


def test_learns_the_mild_penalty_game(tmp_path: Path) -> None:
    """Two averaged learners reach an optimum (team return 2 = 2 agents x payoff 10 / 10) of the penalty game
    with k = -5, where independent learners' utilities favour the optimal actions (see test_offpolicy)."""
    cfg = DQNAvgConfig(n_learners=2, sync_every=25, learning_starts=400, eps_anneal_steps=1500)
    res = train(quick(tmp_path, "learn", env="matrix/penalty?k=-5", steps=2400, num_envs=8, eval_episodes=16,
                      seed=2), cfg)
    assert res.final_eval["eval/return_mean"] == pytest.approx(2.0)
