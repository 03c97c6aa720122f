"""``pamarl compare`` and ``pamarl plot``: the smoke preset end to end, resume, skips, errors, metrics of a run.

The smoke preset is the whole pipeline (parallel training processes, metrics, report, plots) at a budget
of about two minutes on 2 cores; its numbers mean nothing, the test checks the pipeline, not learning.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math

import numpy as np
import pytest
import yaml
from conftest import update_crashes_at

from pamarl.cli import main
from pamarl.compare import PRESETS

HAS_MUJOCO = all(importlib.util.find_spec(m) is not None for m in ("mujoco", "gymnasium_robotics"))
SAFE_ENV = "safe-mamujoco/HalfCheetah-2x3?episode_limit=50"


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")  # `make test` distributes whole files (--dist loadfile): trained once
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "smoke"
    assert main(["compare", "--preset", "smoke", "--out", str(out), "--workers", "2", "--quiet"]) == 0
    return out


def test_smoke_preset_runs_whole_pipeline(smoke, capsys):
    preset = PRESETS["smoke"]
    n_algos, n_seeds = len(preset.algos), preset.seeds
    # QMIX is discrete-only: skipped on the continuous MuJoCo task, and the report says why.
    report = (smoke / "report.md").read_text()
    assert "## Skipped combinations" in report
    if HAS_MUJOCO:
        assert f"| qmix | {SAFE_ENV} | algorithm 'qmix' supports discrete actions only" in report
        combos = 2 * n_algos - 1
    else:  # the whole env is skipped, naming the extra to install
        assert "pip install 'pamarl[mujoco]'" in report
        combos = n_algos
    runs = _csv(smoke / "runs.csv")
    summary = _csv(smoke / "summary.csv")
    assert len(runs) == combos * n_seeds and len(summary) == combos
    assert {r["seeds"] for r in summary} == {str(n_seeds)}
    for r in runs:  # every metric of the spec is there, finite where it is defined
        for key in ("final_return", "t_conv", "eta", "sigma", "sigma_last"):
            assert math.isfinite(float(r[key])), (r["algo"], r["env"], key)
        assert float(r["env_steps"]) >= 2000
    on_policy_mpe = [r for r in runs if r["env"] == "mpe/simple_spread_v3" and r["algo"] in ("mappo", "progressive")]
    assert all(math.isfinite(float(r["rho"])) and -1 <= float(r["rho"]) <= 1 for r in on_policy_mpe)
    assert all(math.isnan(float(r["rho"])) for r in runs if r["algo"] == "qmix")  # greedy Q: no log-probabilities
    # The table: one row per algorithm x env, with the metric columns.
    table = [ln for ln in report.splitlines() if ln.startswith("| mpe/") or ln.startswith("| safe-")]
    assert len(table) == combos
    for col in ("final return", "T_conv", "eta", "sigma (last 10%)", "rho", "IQM return"):
        assert col in report
    # Plots: a return curve per env, the schedule of the progressive family, cost with its limit on safe tasks.
    plots = {p.name for p in (smoke / "plots").iterdir()}
    assert "return_mpe_simple_spread_v3.png" in plots and "schedule.png" in plots
    if HAS_MUJOCO:
        assert "constraint sat." in report
        assert "cost_safe-mamujoco_HalfCheetah-2x3_episode_limit_50.png" in plots
        safe = [r for r in runs if r["env"] == SAFE_ENV]
        assert all(0.0 <= float(r["constraint_satisfaction"]) <= 1.0 for r in safe)
    for name in plots:
        assert (smoke / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(plots/{name})" in report
    # Each run is an ordinary run directory with its own log.
    run_dir = smoke / runs[0]["run_dir"]
    assert (run_dir / "summary.json").exists() and (run_dir / "eval_episodes.jsonl").exists()
    assert "Trained" in (run_dir / "train.log").read_text()

    # Rerunning the same command trains nothing and reproduces the same numbers.
    before = (smoke / "summary.csv").read_text()
    capsys.readouterr()
    assert main(["compare", "--preset", "smoke", "--out", str(smoke), "--workers", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"{combos * n_seeds} finished, 0 to resume, 0 to start" in out
    assert (smoke / "summary.csv").read_text() == before
    # --report-only rewrites the report with the same numbers and shows the command that reproduces it.
    assert main(["compare", "--preset", "smoke", "--out", str(smoke), "--workers", "2", "--report-only"]) == 0
    assert (smoke / "summary.csv").read_text() == before
    report = (smoke / "report.md").read_text()
    assert f"Command: `pamarl compare --preset smoke --out {smoke} --workers 2`" in report
    assert "of training-process time in all" in report


def test_plot_command(smoke, tmp_path, capsys):
    png = tmp_path / "curves.png"
    assert main(["plot", str(smoke), "--out", str(png), "--smooth", "3"]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG" and "wrote" in capsys.readouterr().out
    one = next((smoke / "runs" / "progressive").rglob("seed1"))
    assert main(["plot", str(one), "--metric", "alpha", "--out", str(tmp_path / "a.png")]) == 0
    assert main(["plot", str(one), "--metric", "no/such_column", "--out", str(tmp_path / "x.png")]) == 2
    assert "logged columns" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "nothing_here")]) == 2


def _rows(run_dir):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in _csv(run_dir / "metrics.csv")]


def test_compare_resumes_interrupted_run_and_refuses_other_settings(tmp_path, monkeypatch, capsys):
    from pamarl.algos.registry import get_algorithm
    from pamarl.compare import EnvPlan, build_plan
    from pamarl.config import TrainConfig, build
    from pamarl.runner import train

    args = ["--algos", "mappo", "--envs", "mpe/simple_spread_v3", "--seeds", "1", "--steps", "800", "--workers", "1",
            "--quiet", "num_envs=4", "rollout_len=25", "checkpoint_every=2", "eval_episodes=4", "tensorboard=false"]
    ref = tmp_path / "ref"
    assert main(["compare", "--out", str(ref), *args]) == 0

    # The same run, interrupted after its checkpoint at iteration 4 of 8 (as a crash or Ctrl-C leaves it).
    cut = tmp_path / "cut"
    plan = build_plan(cut, ["mappo"], [EnvPlan("mpe/simple_spread_v3", 800)], [1],
                      {"num_envs": 4, "rollout_len": 25, "checkpoint_every": 2, "eval_episodes": 4,
                       "tensorboard": False}, {}, evals=50)
    job = plan.jobs[0]
    cls = get_algorithm("mappo")

    with update_crashes_at(monkeypatch, cls, 6), pytest.raises(KeyboardInterrupt):
        train(build(TrainConfig, job.config["run"], "run"), build(cls.Config, job.config["algo"], "mappo"))
    assert not (job.run_dir / "summary.json").exists()

    capsys.readouterr()
    assert main(["compare", "--out", str(cut), *args]) == 0
    assert "0 finished, 1 to resume, 0 to start" in capsys.readouterr().out
    ref_run = ref / "runs" / "mappo" / "mpe_simple_spread_v3" / "seed1"
    assert _rows(job.run_dir) == _rows(ref_run)  # exact resume
    assert (job.run_dir / "eval_episodes.jsonl").read_text() == (ref_run / "eval_episodes.jsonl").read_text()
    assert json.loads((job.run_dir / "summary.json").read_text())["env_steps"] == 800

    # Other settings are refused, naming the difference.
    assert main(["compare", "--out", str(cut), *args, "lr=0.001"]) == 2
    err = capsys.readouterr().err
    assert "trained with other settings" in err and "lr" in err and "another --out" in err
    # The automatic evaluation interval follows the budget; extending a run keeps the run's own.
    ext = tmp_path / "ext"
    base = [a for a in args if a not in ("--steps", "800")]
    assert main(["compare", "--out", str(ext), *base, "--steps", "800"]) == 0
    capsys.readouterr()
    assert main(["compare", "--out", str(ext), *base, "--steps", "1200"]) == 0
    assert "0 finished, 1 to resume" in capsys.readouterr().out
    ext_run = ext / "runs" / "mappo" / "mpe_simple_spread_v3" / "seed1"
    assert json.loads((ext_run / "summary.json").read_text())["env_steps"] == 1200


@pytest.mark.parametrize("args,needle", [
    (["--algos", "mapo", "--envs", "mpe/simple_spread_v3"], "mappo"),
    (["--algos", "mappo", "--envs", "mpe/simple_sprea_v3"], "simple_spread_v3"),
    (["--algos", "mappo,qmix", "--envs", "mpe/simple_spread_v3", "epochs=3"], "ALGO:key=value"),
    (["--algos", "mappo", "--envs", "mpe/simple_spread_v3", "qmix:lr=0.1"], "not in --algos"),
    (["--algos", "mappo", "--envs", "mpe/simple_spread_v3", "--seeds", "two"], "--seeds"),
    (["--algos", "mappo"], "--envs"),
    (["--algos", "mappo", "--envs", "mpe/simple_spread_v3", "--cpus-per-run", "2"], "--backend ray"),
])
def test_compare_errors(args, needle, tmp_path, capsys):
    assert main(["compare", "--out", str(tmp_path / "o"), "--dry-run", *args]) == 2
    assert needle in capsys.readouterr().err


def test_dry_run_paper_preset_plans_the_design_document(tmp_path, capsys):
    assert main(["compare", "--preset", "paper", "--out", str(tmp_path / "p"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "expected running time" in out and not (tmp_path / "p").exists()
    for algo in ("progressive", "happo", "mappo", "fixed_ratio", "maddpg", "qmix"):
        assert f" {algo} " in out
    if HAS_MUJOCO:
        assert "mamujoco/ManySegmentAnt-8x1" in out and "safe-mamujoco/HalfCheetah-2x3" in out
        assert "skip qmix on mamujoco/HalfCheetah-2x3" in out


def test_scoped_override_applies_to_one_algorithm(tmp_path):
    from pamarl.compare import EnvPlan, build_plan

    plan = build_plan(tmp_path, ["mappo", "qmix"], [EnvPlan("mpe/simple_spread_v3", 1000)], [1, 2], {"lr": 1e-3},
                      {"mappo": {"epochs": 3}}, evals=50)
    by = {(j.algo, j.seed): j for j in plan.jobs}
    assert by[("mappo", 1)].config["algo"]["epochs"] == 3 and by[("mappo", 1)].config["algo"]["lr"] == 1e-3
    assert by[("qmix", 2)].config["algo"]["lr"] == 1e-3 and "epochs" not in by[("qmix", 2)].config["algo"]
    assert [j.seed for j in plan.jobs] == [1, 1, 2, 2]  # seed-major: every combination's first seed first


def _fake_run(d, returns_per_eval, costs_per_eval=None, coordination=None, train_coord=None):
    """A run directory written by hand: evaluation every 1000 steps."""
    d.mkdir(parents=True)
    has_cost = costs_per_eval is not None
    doc = {"run": {"algo": "mappo", "env": "mpe/simple_spread_v3", "seed": 1, "cost_limit": 1.0 if has_cost else None},
           "algo": {}, "env_spec": {"agents": ["a", "b"], "has_cost": has_cost}}
    (d / "config.yaml").write_text(yaml.safe_dump(doc))
    cols = ["iteration", "env_steps", "eval/return_mean", "eval/coordination", "train/coordination"]
    with open(d / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for t, eps in enumerate(returns_per_eval):
            w.writerow({"iteration": t + 1, "env_steps": 1000 * (t + 1), "eval/return_mean": float(np.mean(eps)),
                        "eval/coordination": "" if coordination is None else coordination[t],
                        "train/coordination": "" if train_coord is None else train_coord[t]})
    with open(d / "eval_episodes.jsonl", "w") as f:
        for t, eps in enumerate(returns_per_eval):
            line = {"iteration": t + 1, "env_steps": 1000 * (t + 1), "returns": list(eps)}
            if has_cost:
                line["costs"] = list(costs_per_eval[t])
            f.write(json.dumps(line) + "\n")


def test_run_metrics_of_a_run_directory(tmp_path):
    from pamarl.results import load_run, run_metrics_of

    # 10 evaluations of 2 episodes; costs: 3 of the 20 episodes exceed the limit of 1.0, all in the first half.
    rets = [[float(t), float(t) + 2.0] for t in range(10)]  # mean t + 1
    costs = [[2.0, 0.0], [3.0, 5.0]] + [[0.5, 1.0]] * 8
    _fake_run(tmp_path / "r", rets, costs, coordination=[""] * 10, train_coord=[0.1 * t for t in range(10)])
    run = load_run(tmp_path / "r")
    assert run.eval_episode_returns.shape == (10, 2) and run.cost_limit == 1.0
    m = run_metrics_of(run)
    assert m["final_return"] == pytest.approx(10.0)  # last 10% = last evaluation, mean of 9 and 11
    assert m["constraint_satisfaction"] == pytest.approx(17 / 20)
    assert m["constraint_satisfaction_last"] == pytest.approx(1.0)
    assert m["sigma"] == pytest.approx(np.std(np.arange(1, 11)))
    assert m["rho"] == pytest.approx(0.9) and m["rho_source"] == 1.0  # evaluation rho undefined: training rho
    # Without the per-episode log the means are used, and a missing run directory is a clear error.
    (tmp_path / "r" / "eval_episodes.jsonl").unlink()
    assert run_metrics_of(load_run(tmp_path / "r"))["final_return"] == pytest.approx(10.0)
    from pamarl.errors import UsageError

    with pytest.raises(UsageError, match="not a pamarl run directory"):
        load_run(tmp_path / "nope")


def test_seed_band_is_mean_and_t_interval():
    from pamarl.plot import seed_band

    x = np.array([0.0, 1.0, 2.0])
    xs, m, lo, hi = seed_band([(x, np.array([0.0, 1.0, 2.0])), (x, np.array([2.0, 3.0, 4.0]))])
    assert np.allclose(m, [1.0, 2.0, 3.0])
    half = 12.7062 * np.std([0.0, 2.0], ddof=1) / np.sqrt(2)  # t(0.975, 1) = 12.706
    assert np.allclose(hi - m, half, rtol=1e-4) and np.allclose(m - lo, half, rtol=1e-4)
    # Seeds evaluated at different steps are interpolated onto the shortest run's grid.
    xs, m, _, _ = seed_band([(x, np.array([0.0, 1.0, 2.0])), (np.array([0.0, 2.0, 4.0]), np.array([0.0, 2.0, 4.0]))])
    assert np.allclose(xs, x) and np.allclose(m, [0.0, 1.0, 2.0])


def test_expected_throughput_prefers_the_task_then_the_family():
    from pamarl.compare import THROUGHPUT, expected_throughput

    assert expected_throughput("onpolicy", "mamujoco/Ant-4x2?episode_limit=200") == THROUGHPUT[("onpolicy",
                                                                                                 "mamujoco/Ant-4x2")]
    # A safe task without its own measurement uses the plain family's figure.
    assert expected_throughput("offpolicy", "safe-mamujoco/Walker2d-2x3") == THROUGHPUT[("offpolicy", "mamujoco")]
    assert expected_throughput("onpolicy", "mpe/simple_tag_v3") == THROUGHPUT[("onpolicy", "mpe")]
    assert expected_throughput("onpolicy", "pettingzoo/some.module:env") == 800.0


def test_launch_decides_from_the_run_directory_and_reports_retries(tmp_path):
    """What the Ray backend's tasks rely on, without Ray: a retry resumes from whatever checkpoint the run
    directory holds, and a launch id seen twice in attempts.jsonl is a retry the report lists."""
    from pamarl.distributed.launch import ATTEMPTS, retries_of, train_args

    d = tmp_path / "run"
    assert train_args(d, 100)[0] == "new"
    (d / "checkpoints").mkdir(parents=True)
    (d / "checkpoints" / "latest.pt").write_bytes(b"")
    state, args = train_args(d, 100)
    assert state == "resume" and args[:3] == ["train", "--resume", str(d)]
    assert train_args(d, 100, "new")[0] == "new"  # the planner's decision wins on a first start
    lines = [{"launch": "a", "state": "new"}, {"launch": "a", "state": "resume", "from_env_steps": 50},
             {"launch": "b", "state": "resume", "from_env_steps": 80}]
    (d / ATTEMPTS).write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert retries_of(d) == [lines[1]]  # "b" is a later invocation's resume, not a retry
