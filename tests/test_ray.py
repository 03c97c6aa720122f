"""Everything that needs Ray, on ONE local two-node Ray cluster (1 CPU each) for the whole module.

The averaging DQN's Ray learners give the numbers of its in-process backend; Ray env workers and Ray rollout
workers give the numbers of the local path (rollout workers also resume exactly); a SIGKILLed learner, env
worker or rollout worker is restarted and the run still ends at its budget with nothing lost; the averaging DQN
finishes when the node of one of its learners is removed; ``pamarl compare --backend ray`` runs the grid, and
when the node holding a run is removed the run is retried from its last checkpoint and the report says so.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import update_crashes_at

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'pamarl[ray]'); these tests need it")

from ray.cluster_utils import Cluster  # noqa: E402

from pamarl.algos.dqn_avg import DQNAvg, DQNAvgConfig  # noqa: E402
from pamarl.config import TrainConfig  # noqa: E402
from pamarl.runner import train  # noqa: E402

SMALL: dict[str, Any] = dict(hidden=(16,), batch_size=16, learning_starts=100, env_steps_per_update=5)
IGNORE = ("wall_s", "time/sync_s", "time/sync_share")


@pytest.fixture(scope="module")
def cluster() -> Any:
    """``.cluster`` and its second node ``.worker`` (a test that removes that node adds a new one there)."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = c.add_node(num_cpus=1)
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
    c.wait_for_nodes()
    yield SimpleNamespace(cluster=c, worker=worker)
    ray.shutdown()
    c.shutdown()


def rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if k not in IGNORE} for r in csv.DictReader(f)]


def quick(tmp_path: Path, name: str, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(algo="dqn_avg", env="mpe/simple_spread_v3", progress=False, tensorboard=False,
                                eval_every=0, run_dir=str(tmp_path / name), num_envs=2, rollout_len=25, steps=500,
                                eval_episodes=2)
    base.update(kw)
    return TrainConfig(**base)


def test_dqn_avg_on_ray_actors_matches_the_in_process_backend(cluster: Any, tmp_path: Path) -> None:
    cfg = dict(n_learners=2, sync_every=10, **SMALL)
    local = train(quick(tmp_path, "local"), DQNAvgConfig(backend="local", **cfg))
    remote = train(quick(tmp_path, "ray"), DQNAvgConfig(backend="ray", **cfg))
    assert rows(local.run_dir) == rows(remote.run_dir)
    assert float(rows(remote.run_dir)[-1]["avg/averages"]) > 0


def _killer(cls: type, method: str, at: int, pids: Any) -> Any:
    """Wrap ``cls.method`` so that its ``at``-th call first SIGKILLs the process ``pids(self)`` names."""
    real = getattr(cls, method)
    calls = {"n": 0, "killed": None}

    def wrapped(self: Any, *a: Any, **k: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == at:
            pid = pids(self)
            os.kill(pid, signal.SIGKILL)
            calls["killed"] = pid
        return real(self, *a, **k)

    return wrapped, calls


def test_sigkilled_learner_is_restarted_and_the_run_reaches_its_budget(cluster: Any, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    wrapped, calls = _killer(DQNAvg, "update", 6,
                             lambda self: self.pool.result(self.pool.submit(0, "pid")))
    monkeypatch.setattr(DQNAvg, "update", wrapped)
    run = quick(tmp_path, "kill", steps=600, checkpoint_every=3)
    res = train(run, DQNAvgConfig(backend="ray", n_learners=2, sync_every=10, **SMALL))
    assert calls["killed"] is not None
    last = rows(res.run_dir)[-1]
    assert res.env_steps == 600 and float(last["avg/restarts"]) >= 1
    assert json.loads((res.run_dir / "summary.json").read_text())["env_steps"] == 600
    assert len(rows(res.run_dir)) == 12 and float(last["avg/averages"]) > 0  # every iteration logged
    assert float(last["train/env_steps_total"]) >= 2 * 600


def test_ray_env_workers_match_local_envs_and_survive_a_sigkill(cluster: Any, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from pamarl.distributed.ray_env import RayVectorEnv

    kw: dict[str, Any] = dict(algo="mappo", steps=400, num_envs=4, rollout_len=25)
    local = train(quick(tmp_path, "envs_local", **kw))
    remote = train(quick(tmp_path, "envs_ray", env_workers=2, env_backend="ray", **kw))
    assert rows(local.run_dir) == rows(remote.run_dir)  # same env copies, same numbers

    wrapped, calls = _killer(RayVectorEnv, "step", 60, lambda self: self.pids()[1])
    monkeypatch.setattr(RayVectorEnv, "step", wrapped)
    res = train(quick(tmp_path, "envs_kill", env_workers=2, env_backend="ray", **kw))
    assert calls["killed"] is not None
    assert res.env_steps == 400 and len(rows(res.run_dir)) == 4
    assert json.loads((res.run_dir / "summary.json").read_text())["env_steps"] == 400


def test_rollout_workers_on_ray_match_the_local_path_and_resume_exactly(cluster: Any, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Two Ray rollout workers give the in-process workers' numbers; a run killed after a checkpoint and resumed
    (on Ray) gives them too, row for row."""
    from pamarl.algos.mappo import MAPPO

    kw: dict[str, Any] = dict(algo="mappo", steps=400, num_envs=4, rollout_len=25, checkpoint_every=2,
                              rollout_workers=2)
    local = train(quick(tmp_path, "rw_local", **kw))

    cut = quick(tmp_path, "rw_ray", env_backend="ray", **kw)
    # The run dies after the checkpoint at iteration 2.
    with update_crashes_at(monkeypatch, MAPPO, 3), pytest.raises(KeyboardInterrupt):
        train(cut)
    assert len(rows(Path(str(cut.run_dir)))) == 2
    train(cut, resume=True)
    assert rows(local.run_dir) == rows(Path(str(cut.run_dir)))
    assert len(rows(local.run_dir)) == 4


def test_sigkilled_rollout_worker_is_restarted_and_the_run_reaches_its_budget(cluster: Any, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from pamarl.distributed.rollout import RolloutCollector

    wrapped, calls = _killer(RolloutCollector, "collect", 2, lambda self: self.pids()[1])
    monkeypatch.setattr(RolloutCollector, "collect", wrapped)
    res = train(quick(tmp_path, "rw_kill", algo="mappo", steps=400, num_envs=4, rollout_len=25, checkpoint_every=1,
                      rollout_workers=2, env_backend="ray"))
    assert calls["killed"] is not None
    got = rows(res.run_dir)
    assert res.env_steps == 400 and [int(r["env_steps"]) for r in got] == [100, 200, 300, 400]
    assert sum(float(r["rollout/restarts"]) for r in got) >= 1
    assert json.loads((res.run_dir / "summary.json").read_text())["env_steps"] == 400
    assert {p.name for p in (res.run_dir / "checkpoints").iterdir()} >= {"latest.pt", "final.pt"}


def test_dqn_avg_finishes_when_a_learners_node_is_removed(cluster: Any, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Learner 1's actor is placed on the second node (the head's CPU is held by a placeholder actor), and that
    node is removed mid-run: Ray restarts the learner on the head, and the run ends at its budget."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    c = cluster.cluster

    @ray.remote(num_cpus=1)
    class Placeholder:
        def node(self) -> str:
            return str(ray.get_runtime_context().get_node_id())

    hold = Placeholder.options(scheduling_strategy=NodeAffinitySchedulingStrategy(c.head_node.node_id, soft=False)
                               ).remote()
    assert ray.get(hold.node.remote(), timeout=120) == c.head_node.node_id
    real, calls = DQNAvg.update, {"n": 0}

    def removing_update(self: Any, progress: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 5:  # after the checkpoint at iteration 3
            ray.kill(hold)  # frees the head's CPU for the restart
            c.remove_node(cluster.worker)
            calls["removed"] = True
        return real(self, progress)

    monkeypatch.setattr(DQNAvg, "update", removing_update)
    try:
        res = train(quick(tmp_path, "node", steps=600, checkpoint_every=3),
                    DQNAvgConfig(backend="ray", n_learners=2, sync_every=10, **SMALL))
    finally:
        if calls.get("removed"):  # the last test needs a second node again
            cluster.worker = c.add_node(num_cpus=1)
            c.wait_for_nodes()
    got = rows(res.run_dir)
    assert res.env_steps == 600 and len(got) == 12 and float(got[-1]["avg/restarts"]) >= 1
    assert float(got[-1]["train/env_steps_total"]) >= 2 * 600
    assert json.loads((res.run_dir / "summary.json").read_text())["env_steps"] == 600


def test_compare_on_ray_retries_a_run_whose_node_died(cluster: Any, tmp_path: Path, capsys: Any) -> None:
    """Last in the module: it removes the cluster's second node."""
    from pamarl.cli import main

    c, worker = cluster.cluster, cluster.worker
    out = tmp_path / "cmp"
    args = ["compare", "--algos", "mappo", "--envs", "mpe/simple_spread_v3", "--seeds", "2", "--steps", "2500",
            "--out", str(out), "--backend", "ray", "--address", c.address, "--quiet", "num_envs=2",
            "rollout_len=25", "checkpoint_every=5", "eval_episodes=2", "tensorboard=false", "--evals", "2"]
    removed: dict[str, Any] = {}

    def remove_worker_node() -> None:
        deadline = time.time() + 600  # generous: Ray tasks start slowly on a loaded 2-core machine
        while time.time() < deadline and not removed:
            for d in (out / "runs" / "mappo" / "mpe_simple_spread_v3").glob("seed*"):
                try:
                    first = json.loads((d / "attempts.jsonl").read_text().splitlines()[0])
                except (OSError, IndexError, ValueError):
                    continue
                if first.get("ray_node_id") == worker.node_id and (d / "checkpoints" / "latest.pt").exists():
                    c.remove_node(worker)
                    removed["run"] = d
                    return
            time.sleep(0.2)

    t = threading.Thread(target=remove_worker_node)
    t.start()
    assert main(args) == 0
    t.join()
    assert removed, "no run was placed on the second node"
    for d in (out / "runs" / "mappo" / "mpe_simple_spread_v3").glob("seed*"):
        assert json.loads((d / "summary.json").read_text())["env_steps"] == 2500
    attempts = [json.loads(x) for x in (removed["run"] / "attempts.jsonl").read_text().splitlines()]
    assert len(attempts) == 2 and attempts[1]["state"] == "resume" and attempts[1]["from_env_steps"] > 0
    assert attempts[0]["launch"] == attempts[1]["launch"]
    report = (out / "report.md").read_text()
    assert "## Retried runs" in report and "resumed at" in report
    # Rerunning the command trains nothing: the run directories say both runs are finished.
    capsys.readouterr()
    assert main(args) == 0
    assert "2 finished, 0 to resume, 0 to start" in capsys.readouterr().out
