"""Rollout workers (``rollout_workers=W``) on the in-process backend, without Ray: the collection is the learner's
own loop with the worker's sampling stream, resume is exact, bad settings are refused. tests/test_ray.py runs the
same workers as Ray actors and checks they give these numbers."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import quick_run, update_crashes_at

from pamarl.algos.registry import get_algorithm
from pamarl.collect import EnvCollector
from pamarl.distributed.rollout import RolloutCollector, rollout_seed
from pamarl.envs.registry import make_env
from pamarl.errors import UsageError
from pamarl.runner import apply_reward_convention, build_configs, make_algorithm, train


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in csv.DictReader(f)]


def test_one_worker_collects_what_the_learner_collects_with_the_workers_stream(tmp_path: Path) -> None:
    """W=1: the worker's rollout, reassembled by the learner, is the in-process loop's rollout (bit for bit) when
    the learner samples from the worker's stream: obs, next/final observations, episodes and logps in order."""
    run = quick_run(tmp_path, algo="mappo", num_envs=3, rollout_len=40, rollout_workers=1)
    cfg = get_algorithm("mappo").Config()
    shape = lambda st: apply_reward_convention(st, "team")  # noqa: E731
    rng = torch.get_rng_state()
    workers = RolloutCollector(run, cfg)
    assert torch.equal(rng, torch.get_rng_state())  # the learner's initial parameters are as without workers
    plain = EnvCollector(make_env(run.env, num_envs=3, seed=run.seed), run.rollout_len)
    try:
        a, b = (make_algorithm(run, cfg, workers.spec) for _ in range(2))
        b.load_state_dict(a.state_dict())
        for it in range(2):
            workers.reset(1234 + it)
            plain.reset(1234 + it)
            b.generator.manual_seed(rollout_seed(run.seed, it, 0))
            got_a, got_b = workers.collect(a, it, shape), plain.collect(b, it, shape)
            da, db = a.buffer.data(), b.buffer.data()  # type: ignore[attr-defined]
            for f in dataclasses.fields(da):
                x, y = getattr(da, f.name), getattr(db, f.name)
                assert (x is None and y is None) or torch.equal(x, y), f.name
            assert [dataclasses.asdict(e) for e in got_a.episodes] == [dataclasses.asdict(e) for e in got_b.episodes]
            assert len(got_a.episodes) == 3  # 40 steps of 25-step episodes in each of the 3 copies
            assert torch.equal(torch.cat(got_a.logps), torch.cat(got_b.logps))
            assert got_a.metrics == {"rollout/restarts": 0.0}
            a.buffer.reset()  # type: ignore[attr-defined]
            b.buffer.reset()  # type: ignore[attr-defined]
    finally:
        workers.close()
        plain.close()


def test_resume_with_rollout_workers_matches_the_uninterrupted_run(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    kw: dict[str, Any] = dict(algo="mappo", steps=800, num_envs=4, rollout_len=25, checkpoint_every=2,
                              eval_every=3, eval_episodes=2, rollout_workers=2)
    full = train(quick_run(tmp_path, "full", **kw))
    cls = get_algorithm("mappo")

    cut = quick_run(tmp_path, "cut", **kw)
    # The run dies after the checkpoint at iteration 4.
    with update_crashes_at(monkeypatch, cls, 6), pytest.raises(KeyboardInterrupt):
        train(cut)
    train(cut, resume=True)
    assert _rows(tmp_path / "cut") == _rows(full.run_dir)
    assert len(_rows(full.run_dir)) == 8 and all(r["rollout/restarts"] == "0.0" for r in _rows(full.run_dir))


@pytest.mark.parametrize("values, match", [
    ({"algo": "iql", "rollout_workers": 2}, "on-policy family"),
    ({"algo": "mappo", "rollout_workers": 5, "num_envs": 4}, "more than num_envs=4"),
    ({"algo": "mappo", "rollout_workers": 2, "env_workers": 2}, "set env_workers=0"),
    ({"algo": "mappo", "rollout_workers": -1}, "rollout_workers"),
])
def test_bad_rollout_worker_settings_are_refused(values: dict[str, Any], match: str) -> None:
    with pytest.raises(UsageError, match=match):
        build_configs(values)


def test_rollout_workers_refuse_a_non_on_policy_run_given_directly(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="on-policy family"):
        train(quick_run(tmp_path, algo="iql", steps=100, num_envs=2, rollout_len=10, rollout_workers=2))
    assert not (tmp_path / "run").exists()
