"""``pamarl compare``: run algorithms x envs x seeds, then write a comparison report.

::

    pamarl compare --algos progressive,happo,mappo,fixed_ratio,maddpg,qmix \\
        --envs mpe/simple_spread_v3,'safe-mamujoco/HalfCheetah-2x3?episode_limit=200' \\
        --seeds 3 --steps 100000 --out cmp --workers 2
    pamarl compare --preset smoke --out cmp-smoke      # the whole pipeline in a few minutes
    pamarl compare --preset paper --out cmp-paper --dry-run   # the design document's experiment: plan + time

Every (algorithm, env, seed) is one ordinary training run in ``OUT/runs/<algo>/<env>/seed<k>/``,
started as its own ``pamarl train`` process (at most ``--workers`` at once; its output goes to
``train.log`` there). Combinations an algorithm cannot run (discrete-only QMIX on a continuous task,
an env whose optional extra is missing) are skipped, and the report says which and why.

Resumable: rerunning the same command skips finished runs, resumes interrupted ones from their last
checkpoint and extends finished ones when ``--steps`` grew. A run directory trained with other
settings is an error (use another ``--out``), so one report never mixes configurations.

The report (``OUT/report.md``, ``summary.csv``, ``runs.csv``, ``plots/*.png``) is computed from the
runs' logged evaluations with :mod:`pamarl.metrics`: final return, constraint satisfaction rate,
convergence steps T_conv, learning efficiency eta, stability sigma (whole run and last 10%) and
coordination rho, per run and over seeds (mean with a 95% t-interval; IQM with a bootstrap interval).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pamarl.errors import UsageError
from pamarl.plot import slug

DEFAULT_EVALS = 50
"""Evaluations per run when the config does not fix ``eval_every``: enough points for T_conv and sigma."""

IGNORED_IN_CHECK = ("steps", "run_dir", "progress", "tensorboard", "env_workers", "torch_threads")
"""Config keys that may differ between a run on disk and the planned one (they do not change results,
or, for ``steps``, are handled by extending the run)."""


# ----------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class EnvPlan:
    """One env of a comparison with its budget and env-specific run settings."""

    env: str
    steps: int
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Preset:
    algos: tuple[str, ...]
    envs: tuple[EnvPlan, ...]
    seeds: int
    description: str
    overrides: dict[str, Any] = field(default_factory=dict)
    algo_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    evals: int = DEFAULT_EVALS


PAPER_ALGOS = ("progressive", "happo", "mappo", "fixed_ratio", "maddpg", "qmix")
_MUJOCO = {"num_envs": 8, "rollout_len": 200, "eval_episodes": 8}
_MPE = {"num_envs": 8, "rollout_len": 200, "eval_episodes": 16}

PRESETS: dict[str, Preset] = {
    "paper": Preset(
        algos=PAPER_ALGOS,
        envs=(
            # Multi-Agent MuJoCo with 2 to 8 agents (MaMuJoCo's Ant splits into at most 4; the 8-agent
            # ant is its ManySegmentAnt). 5000 iterations of 8 x 200 steps: the top of the design
            # document's "1000-5000 training rounds" (HARL uses 10M steps on these tasks).
            *(EnvPlan(f"mamujoco/{t}", 8_000_000, _MUJOCO)
              for t in ("HalfCheetah-2x3", "HalfCheetah-6x1", "Ant-2x4", "Ant-4x2", "ManySegmentAnt-8x1",
                        "Walker2d-2x3")),
            # Their safe variants (velocity cost; limit 25 per 1000-step episode).
            *(EnvPlan(f"safe-mamujoco/{t}", 8_000_000, _MUJOCO) for t in ("HalfCheetah-2x3", "Ant-2x4")),
            # Discrete-action MPE, where QMIX runs too.
            *(EnvPlan(f"mpe/{t}", 2_000_000, _MPE)
              for t in ("simple_spread_v3", "simple_reference_v3", "simple_speaker_listener_v4")),
        ),
        seeds=3,
        description="the design document's experiment (seed 000, section 5): progressive vs HAPPO, MAPPO, "
        "fixed-ratio (alpha 0.5), MADDPG and QMIX on MaMuJoCo 2-8 agents incl. safe tasks (8M steps) and "
        "discrete MPE (2M steps), 3 seeds",
    ),
    "smoke": Preset(
        algos=PAPER_ALGOS,
        envs=(
            EnvPlan("mpe/simple_spread_v3", 2_000, {"num_envs": 4, "rollout_len": 25}),
            EnvPlan("safe-mamujoco/HalfCheetah-2x3?episode_limit=50", 2_000, {"num_envs": 4, "rollout_len": 50}),
        ),
        seeds=2,
        description="the whole pipeline in about two minutes: the paper's six algorithms on a discrete MPE task "
        "and a safe MaMuJoCo task, 2 seeds, 2k steps (numbers are meaningless at this budget)",
        overrides={"eval_episodes": 4, "checkpoint_every": 5},
        algo_overrides={a: {"learning_starts": 500} for a in ("maddpg", "qmix")},
        evals=5,
    ),
}

# Env steps per second of one training run on the 2-core machine with a second run beside it (as
# `pamarl compare --workers 2` runs them), used only for --dry-run's time estimate. benchmarks/README.md
# has the commands that measured them.
THROUGHPUT: dict[tuple[str, str], float] = {
    # Per task: steady state (from the second iteration on) of 16k-step probes, progressive for on-policy
    # and MADDPG for off-policy, 8 envs x 200 steps, the paper preset's settings.
    ("onpolicy", "mamujoco/HalfCheetah-2x3"): 2_380.0,
    ("onpolicy", "mamujoco/HalfCheetah-6x1"): 1_220.0,
    ("onpolicy", "mamujoco/Ant-2x4"): 870.0,
    ("onpolicy", "mamujoco/Ant-4x2"): 710.0,
    ("onpolicy", "mamujoco/ManySegmentAnt-8x1"): 270.0,
    ("onpolicy", "mamujoco/Walker2d-2x3"): 1_060.0,
    ("onpolicy", "safe-mamujoco/HalfCheetah-2x3"): 1_270.0,
    ("onpolicy", "safe-mamujoco/Ant-2x4"): 745.0,
    ("onpolicy", "mpe/simple_spread_v3"): 1_280.0,
    ("onpolicy", "mpe/simple_reference_v3"): 2_510.0,
    ("onpolicy", "mpe/simple_speaker_listener_v4"): 2_720.0,
    ("offpolicy", "mamujoco/HalfCheetah-2x3"): 627.0,
    ("offpolicy", "mamujoco/HalfCheetah-6x1"): 235.0,
    ("offpolicy", "mamujoco/Ant-2x4"): 373.0,
    ("offpolicy", "mamujoco/Ant-4x2"): 216.0,
    ("offpolicy", "mamujoco/ManySegmentAnt-8x1"): 93.0,
    ("offpolicy", "mamujoco/Walker2d-2x3"): 463.0,
    ("offpolicy", "safe-mamujoco/HalfCheetah-2x3"): 489.0,
    ("offpolicy", "safe-mamujoco/Ant-2x4"): 350.0,
    ("offpolicy", "mpe/simple_spread_v3"): 394.0,
    ("offpolicy", "mpe/simple_reference_v3"): 406.0,
    ("offpolicy", "mpe/simple_speaker_listener_v4"): 556.0,
    # Per family, for other tasks: the README comparison's 100k-step runs (evaluations included), and
    # single runs on the matrix games.
    ("onpolicy", "mpe"): 1_250.0,
    ("offpolicy", "mpe"): 330.0,
    ("onpolicy", "mamujoco"): 650.0,
    ("offpolicy", "mamujoco"): 220.0,
    ("onpolicy", "matrix"): 4_600.0,
    ("offpolicy", "matrix"): 750.0,
}


def expected_throughput(kind: str, env: str) -> float:
    """Env steps/s of one run of an ``onpolicy``/``offpolicy`` algorithm on ``env``, from :data:`THROUGHPUT`.

    The task's own measurement when there is one (query parameters ignored), else its family's (a safe
    family falls back to the plain one), else 800.
    """
    from pamarl.envs.registry import parse_env_id

    fam, task, _ = parse_env_id(env)
    for key in (f"{fam}/{task}", fam, fam.removeprefix("safe-")):
        if (kind, key) in THROUGHPUT:
            return THROUGHPUT[(kind, key)]
    return 800.0


# ----------------------------------------------------------------------------- plan
@dataclass
class Job:
    algo: str
    env: str
    seed: int
    steps: int
    run_dir: Path
    config: dict[str, dict[str, Any]]
    """``{"run": ..., "algo": ...}`` exactly as the run will be configured."""
    auto_eval: bool = False
    """``eval_every`` was derived from the budget (``--evals``), not set: a longer budget may change it."""
    state: str = "new"
    """new | resume | done (decided by :func:`inspect_job`)."""
    done_steps: int = 0


@dataclass
class Plan:
    out: Path
    jobs: list[Job]
    skipped: list[tuple[str, str, str]]
    """(algo, env, reason) for combinations that cannot run."""
    algos: list[str]
    envs: list[str]
    seeds: list[int]
    steps: dict[str, int]


def _parse_seeds(text: str) -> list[int]:
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        else:
            n = int(text)
            if n < 1:
                raise ValueError
            seeds = list(range(1, n + 1))
    except ValueError:
        raise UsageError(f"--seeds takes a count (3: seeds 1,2,3) or a list (1,5,9), got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds lists a seed twice: {text!r}")
    return seeds


def _split_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _parse_overrides(items: list[str], algos: list[str]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``key=value`` (all runs) and ``ALGO:key=value`` (one algorithm's runs)."""
    from pamarl.config import parse_overrides

    common: dict[str, Any] = {}
    scoped: dict[str, dict[str, Any]] = {}
    for item in items:
        head, sep, _ = item.partition("=")
        if sep and ":" in head:
            algo, _, rest = item.partition(":")
            if algo not in algos:
                raise UsageError(
                    f"override {item!r} names algorithm {algo!r}, which is not in --algos ({','.join(algos)})"
                )
            scoped.setdefault(algo, {}).update(parse_overrides([rest]))
        else:
            common.update(parse_overrides([item]))
    return common, scoped


def _env_spec(env: str) -> Any:
    from pamarl.envs.registry import make_env

    e = make_env(env, num_envs=1, seed=0)
    try:
        return e.spec
    finally:
        e.close()


def build_plan(out: Path, algos: list[str], envs: list[EnvPlan], seeds: list[int], common: dict[str, Any],
               scoped: dict[str, dict[str, Any]], evals: int) -> Plan:
    """Every (algo, env, seed) run with its full config; incompatible combinations with the reason."""
    from pamarl.algos.registry import get_algorithm
    from pamarl.config import to_dict
    from pamarl.runner import build_configs

    for a in algos:
        get_algorithm(a)  # unknown names fail here, before anything runs
    jobs: list[Job] = []
    skipped: list[tuple[str, str, str]] = []
    from pamarl.envs.registry import missing_extra

    for ep in envs:
        extra = missing_extra(ep.env)  # a wrong env id is an error, not a skip
        if extra is not None:
            why = f"the env needs an optional dependency that is not installed: pip install 'pamarl[{extra}]'"
            skipped.extend((a, ep.env, why) for a in algos)
            continue
        spec = _env_spec(ep.env)
        for a in algos:
            cls = get_algorithm(a)
            try:
                cls.check_env(spec)
            except UsageError as e:
                skipped.append((a, ep.env, str(e)))
                continue
            values = {**ep.overrides, **common, **scoped.get(a, {}), "algo": a, "env": ep.env, "steps": ep.steps,
                      "progress": False}
            try:
                run, algo_cfg = build_configs(values)
            except UsageError as e:
                raise UsageError(f"{a} on {ep.env}: {e} (scope a key to one algorithm with ALGO:key=value)") from e
            auto = "eval_every" not in {**ep.overrides, **common, **scoped.get(a, {})}
            if auto:
                iters = math.ceil(run.steps / (run.num_envs * run.rollout_len))
                run = dataclasses.replace(run, eval_every=max(1, round(iters / max(1, evals))))
            for s in seeds:
                d = out / "runs" / a / slug(ep.env) / f"seed{s}"
                r = dataclasses.replace(run, seed=s, run_dir=str(d))
                jobs.append(Job(a, ep.env, s, r.steps, d, {"run": to_dict(r), "algo": to_dict(algo_cfg)}, auto))
    # Seed-major order: the first seed of every combination finishes first, so an interrupted
    # comparison already has a (one-seed) report of everything.
    jobs.sort(key=lambda j: seeds.index(j.seed))
    return Plan(out, jobs, skipped, algos, [e.env for e in envs], seeds, {e.env: e.steps for e in envs})


def _diff(saved: dict[str, Any], planned: dict[str, Any], prefix: str, ignore: tuple[str, ...] = ()) -> list[str]:
    out = []
    for k in sorted(set(saved) | set(planned)):
        if k in IGNORED_IN_CHECK or k in ignore:
            continue
        a, b = saved.get(k), planned.get(k)
        if isinstance(a, list | tuple):
            a = list(a)
        if isinstance(b, list | tuple):
            b = list(b)
        if a != b:
            out.append(f"{prefix}{k}: {a!r} on disk, {b!r} now")
    return out


def inspect_job(job: Job) -> None:
    """Decide whether ``job`` is done, resumable or new; refuse a run directory with other settings."""
    from pamarl.checkpoint import load_checkpoint
    from pamarl.errors import CheckpointError

    d = job.run_dir
    ckpt = d / "checkpoints" / "latest.pt"
    cfg = d / "config.yaml"
    if not ckpt.exists():
        job.state = "new"
        return
    if cfg.is_file():
        try:
            saved = yaml.safe_load(cfg.read_text()) or {}
            if not isinstance(saved, dict):
                raise TypeError("not a mapping")
        except (yaml.YAMLError, UnicodeDecodeError, TypeError, OSError) as e:
            raise UsageError(f"{cfg} is corrupt ({type(e).__name__}); move {d} away to retrain that run, or write "
                             "this comparison to another --out") from e
        # A resumed run keeps its own evaluation interval when compare chose it from the budget.
        diffs = _diff(saved.get("run", {}), job.config["run"], "", ("eval_every",) if job.auto_eval else ())
        diffs += _diff(saved.get("algo", {}), job.config["algo"], "algo ")
        if diffs:
            raise UsageError(
                f"{d} was trained with other settings ({'; '.join(diffs[:4])}). Rerun with the original "
                "settings to resume it, or write this comparison to another --out"
            )
    summary = d / "summary.json"
    if summary.is_file():
        import json

        try:
            done = int(json.loads(summary.read_text()).get("env_steps", 0))
        except (json.JSONDecodeError, ValueError):
            done = 0
        if done >= job.steps:
            job.state, job.done_steps = "done", done
            return
    try:
        state = load_checkpoint(ckpt)
        job.done_steps = int(state["env_steps"])
    except (CheckpointError, KeyError):
        job.state, job.done_steps = "new", 0  # nothing usable: start over
        return
    job.state = "resume"


# ----------------------------------------------------------------------------- running
def _command(job: Job) -> list[str]:
    base = [sys.executable, "-m", "pamarl.cli", "train"]
    if job.state == "resume":
        # --env re-states the env id this command was given (inspect_job checked it matches the run's),
        # so an id that imports code is never taken from the run directory alone.
        return [*base, "--resume", str(job.run_dir), "--env", job.env, "--steps", str(job.steps), "progress=false"]
    launch = job.run_dir / "launch.yaml"
    return [*base, "--config", str(launch)]


def _start(job: Job) -> subprocess.Popen[bytes]:
    if job.state == "new" and job.run_dir.exists():
        shutil.rmtree(job.run_dir)  # a run that died before its first checkpoint: nothing to keep
    job.run_dir.mkdir(parents=True, exist_ok=True)
    if job.state == "new":
        (job.run_dir / "launch.yaml").write_text(yaml.safe_dump(job.config, sort_keys=False))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(job.run_dir / "train.log", "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {job.state}: {shlex.join(_command(job))}\n".encode())
        log.flush()
        # Own session: Ctrl-C reaches this process only, which then stops the runs in order.
        return subprocess.Popen(_command(job), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _progress_of(job: Job) -> int:
    """Env steps of a running job, from the last line of its metrics.csv (cheap to read)."""
    p = job.run_dir / "metrics.csv"
    try:
        with open(p, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4096))
            tail = f.read().decode(errors="replace").strip().splitlines()
        if len(tail) < 2:
            return job.done_steps
        return int(float(tail[-1].split(",")[1]))
    except (OSError, ValueError, IndexError):
        return job.done_steps


def _log_tail(job: Job, n: int = 6) -> str:
    try:
        lines = (job.run_dir / "train.log").read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join("    " + ln for ln in lines[-n:])


def run_jobs(jobs: list[Job], workers: int, quiet: bool = False) -> tuple[list[Job], list[tuple[Job, str]]]:
    """Run the jobs that are not done, ``workers`` at a time; returns (finished, failed with a log tail)."""
    from tqdm import tqdm

    todo = [j for j in jobs if j.state != "done"]
    total = sum(j.steps for j in jobs)
    done_steps = {id(j): (j.steps if j.state == "done" else j.done_steps) for j in jobs}
    bar = tqdm(total=total, initial=sum(done_steps.values()), unit="step", unit_scale=True, disable=quiet,
               dynamic_ncols=True, mininterval=1.0, desc=f"compare ({len(todo)} runs to go)")
    running: dict[int, tuple[Job, subprocess.Popen[bytes], float]] = {}
    finished: list[Job] = []
    failed: list[tuple[Job, str]] = []
    queue = list(todo)
    try:
        while queue or running:
            while queue and len(running) < workers:
                job = queue.pop(0)
                running[id(job)] = (job, _start(job), time.perf_counter())
                bar.write(f"start  {job.algo:<12} {job.env}  seed {job.seed}"
                          + (f"  (resuming at {job.done_steps:,} steps)" if job.state == "resume" else ""))
            time.sleep(0.5)
            for key, (job, proc, t0) in list(running.items()):
                done_steps[key] = max(done_steps[key], _progress_of(job))
                rc = proc.poll()
                if rc is None:
                    continue
                del running[key]
                if rc == 0:
                    done_steps[key] = job.steps
                    job.state = "done"
                    finished.append(job)
                    bar.write(f"done   {job.algo:<12} {job.env}  seed {job.seed}  ({time.perf_counter() - t0:.0f} s)"
                              + _eval_note(job))
                else:
                    tail = _log_tail(job)
                    failed.append((job, tail))
                    bar.write(f"FAILED {job.algo:<12} {job.env}  seed {job.seed} (exit {rc}); "
                              f"see {job.run_dir / 'train.log'}:\n{tail}")
            bar.set_description(f"compare ({len(queue) + len(running)} runs to go)", refresh=False)
            now = sum(done_steps.values())
            if now > bar.n:
                bar.update(now - bar.n)  # redraws at most once per mininterval
    except KeyboardInterrupt:
        for _job, proc, _ in running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # the runner stops between iterations; checkpoints stay intact
        deadline = time.time() + 20
        for _job, proc, _ in running.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
        raise
    finally:
        bar.close()
    return finished, failed


def _eval_note(job: Job) -> str:
    import json

    try:
        s = json.loads((job.run_dir / "summary.json").read_text())
        return f", eval return {s['eval/return_mean']:.2f}" if "eval/return_mean" in s else ""
    except (OSError, ValueError, KeyError):
        return ""


# ----------------------------------------------------------------------------- report
METRIC_COLUMNS = [
    # (metric key, table header, format, higher is better?)
    ("final_return", "final return", "ret", True),
    ("final_cost", "cost (last 10%)", "ret", False),
    ("constraint_satisfaction", "constraint sat.", "pct", True),
    ("t_conv", "T_conv (steps)", "steps", False),
    ("eta", "eta (return / 1M steps)", "eta", True),
    ("sigma", "sigma", "ret", False),
    ("sigma_last", "sigma (last 10%)", "ret", False),
    ("rho", "rho", "rho", None),
]


def _fmt(x: float, kind: str) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    if kind == "pct":
        return f"{100 * x:.0f}%"
    if kind == "steps":
        return f"{x / 1e3:,.0f}k" if abs(x) >= 1e4 else f"{x:,.0f}"
    if kind == "eta":
        return f"{x * 1e6:.3g}"
    if kind == "rho":
        return f"{x:.2f}"
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def _cell(agg: dict[str, float], kind: str) -> str:
    """``mean ± half-width of the t-interval`` (just the mean with one seed)."""
    m = agg["mean"]
    if not math.isfinite(m):
        return "n/a"
    if agg["n"] >= 2 and math.isfinite(agg["ci_high"]):
        half = (agg["ci_high"] - agg["ci_low"]) / 2
        if kind == "pct":
            return f"{100 * m:.0f}% ± {100 * half:.0f}"
        if kind == "eta":
            return f"{m * 1e6:.3g} ± {half * 1e6:.2g}"
        return f"{_fmt(m, kind)} ± {_fmt(half, kind)}"
    return _fmt(m, kind)


@dataclass
class Report:
    path: Path
    table: str
    plots: list[Path]
    rows: list[dict[str, Any]]


def write_report(plan: Plan, command: str, wall_s: float | None = None,
                 failed: list[tuple[Job, str]] | None = None) -> Report:
    """Metrics of every finished run, aggregated over seeds, as report.md + summary.csv + runs.csv + plots."""
    from pamarl.metrics import aggregate, iqm_ci
    from pamarl.plot import plot_metric, plot_schedule
    from pamarl.results import load_run, run_metrics_of

    out = plan.out
    done_jobs = [j for j in plan.jobs if j.state == "done"]
    runs = {id(j): load_run(j.run_dir) for j in done_jobs}
    per_run: list[dict[str, Any]] = []
    groups: dict[tuple[str, str], list[dict[str, float]]] = {}
    for j in done_jobs:
        m = run_metrics_of(runs[id(j)])
        per_run.append({"env": j.env, "algo": j.algo, "seed": j.seed, "run_dir": str(j.run_dir.relative_to(out)), **m})
        groups.setdefault((j.env, j.algo), []).append(m)

    # runs.csv: one row per run.
    metric_keys = [k for k in per_run[0] if k not in ("env", "algo", "seed", "run_dir")] if per_run else []
    _write_csv(out / "runs.csv", ["env", "algo", "seed", "run_dir", *metric_keys], per_run)

    # summary.csv: one row per (algo, env), every metric's mean / t-interval / IQM + bootstrap interval.
    summary_rows: list[dict[str, Any]] = []
    aggs: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
    for env in plan.envs:
        for algo in plan.algos:
            ms = groups.get((env, algo))
            if not ms:
                continue
            agg = {k: aggregate([m[k] for m in ms], n_boot=2000) for k in metric_keys}
            aggs[(env, algo)] = agg
            row: dict[str, Any] = {"env": env, "algo": algo, "seeds": len(ms)}
            for k in metric_keys:
                a = agg[k]
                for stat in ("mean", "std", "ci_low", "ci_high", "iqm", "iqm_low", "iqm_high"):
                    row[f"{k}_{stat}"] = a[stat]
            summary_rows.append(row)
    cols = ["env", "algo", "seeds"] + [f"{k}_{s}" for k in metric_keys
                                       for s in ("mean", "std", "ci_low", "ci_high", "iqm", "iqm_low", "iqm_high")]
    _write_csv(out / "summary.csv", cols, summary_rows)

    # Plots.
    plots_dir = out / "plots"
    all_runs = list(runs.values())
    plots: list[tuple[str, Path]] = []
    for env in plan.envs:
        env_runs = [r for r in all_runs if r.env == env]
        if not env_runs:
            continue
        p = plot_metric(env_runs, "eval/return_mean", "evaluation team return", plots_dir / f"return_{slug(env)}.png",
                        algo_order=plan.algos)
        if p:
            plots.append((f"Evaluation return, {env}", p))
        if any(r.has_cost for r in env_runs):
            p = plot_metric(env_runs, "eval/cost_mean", "evaluation episode cost", plots_dir / f"cost_{slug(env)}.png",
                            limit_line=True, algo_order=plan.algos)
            if p:
                plots.append((f"Evaluation episode cost with the cost limit, {env}", p))
    p = plot_schedule(all_runs, plots_dir / "schedule.png")
    if p:
        plots.append(("Critical share alpha and critical agents k over training (progressive family)", p))

    # Table.
    has_cost = any(r.has_cost for r in all_runs)
    columns = [c for c in METRIC_COLUMNS if c[0] not in ("constraint_satisfaction", "final_cost") or has_cost]
    head = ["env", "algorithm", "seeds", *(c[1] for c in columns), "IQM return [95% CI]", "env steps/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for env in plan.envs:
        best = max((aggs[(env, a)]["final_return"]["mean"] for a in plan.algos if (env, a) in aggs), default=None)
        for algo in plan.algos:
            if (env, algo) not in aggs:
                continue
            agg = aggs[(env, algo)]
            cells = []
            for key, _, kind, _ in columns:
                c = _cell(agg[key], kind)
                if key == "final_return" and best is not None and agg[key]["mean"] == best and len(aggs) > 1:
                    c = f"**{c}**"
                if key == "rho" and agg["rho_source"]["mean"] > 0:
                    c += " †"
                cells.append(c)
            fr = [m["final_return"] for m in groups[(env, algo)]]
            q, lo, hi = iqm_ci(fr, n_boot=2000) if len(fr) > 1 else (fr[0], math.nan, math.nan)
            iqm_cell = f"{_fmt(q, 'ret')} [{_fmt(lo, 'ret')}, {_fmt(hi, 'ret')}]" if len(fr) > 1 else _fmt(q, "ret")
            sps = agg["env_steps_per_s"]["mean"]
            lines.append("| " + " | ".join([env, algo, str(int(agg["final_return"]["n"])), *cells, iqm_cell,
                                            f"{sps:,.0f}" if math.isfinite(sps) else "n/a"]) + " |")
    table = "\n".join(lines)

    # The comparison's cost in process time: the runs' own wall_s (summary.json, read by run_metrics_of).
    train_s = sum(r["wall_s"] for r in per_run if math.isfinite(r["wall_s"]))
    md = _report_markdown(plan, command, table, plots, wall_s, train_s, failed or [])
    (out / "report.md").write_text(md)
    return Report(out / "report.md", table, [p for _, p in plots], summary_rows)


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    path.write_text(buf.getvalue())


def _budget_lines(plan: Plan) -> list[str]:
    out = []
    for env in plan.envs:
        jobs = [j for j in plan.jobs if j.env == env]
        if not jobs:
            continue
        r = jobs[0].config["run"]
        out.append(f"- `{env}`: {plan.steps[env]:,} env steps per run ({r['num_envs']} envs x {r['rollout_len']} "
                   f"steps per iteration), evaluation every {r['eval_every']} iterations over {r['eval_episodes']} "
                   f"episodes ({'greedy' if r['eval_deterministic'] else 'sampled'} actions)")
    return out


def _report_markdown(plan: Plan, command: str, table: str, plots: list[tuple[str, Path]], wall_s: float | None,
                     train_s: float,
                     failed: list[tuple[Job, str]]) -> str:
    import torch

    n_done = sum(j.state == "done" for j in plan.jobs)
    lines = [
        "# pamarl comparison",
        "",
        f"Command: `{command}`",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M')} on {platform.node() or 'this machine'} "
        f"({os.cpu_count()} CPU cores, Python {platform.python_version()}, torch {torch.__version__})"
        + (f"; this invocation ran for {wall_s / 60:.1f} min." if wall_s is not None else "."),
        "",
        f"Algorithms: {', '.join(plan.algos)}. Seeds: {', '.join(map(str, plan.seeds))}. "
        f"Runs finished: {n_done} of {len(plan.jobs)}"
        + (f", {_human(train_s)} of training-process time in all (sum of the runs' wall_s)." if train_s else "."),
        "",
        "Budget:",
        "",
        *_budget_lines(plan),
        "",
        "## Results",
        "",
        "Mean over seeds ± half-width of the 95% Student-t interval (bold: best final return on the env). "
        "Metrics are computed from the evaluation log of each run (`pamarl.metrics`, definitions below); "
        "per-run values are in `runs.csv`, all aggregates (std, t-interval, IQM with bootstrap interval) "
        "in `summary.csv`.",
        "",
        table if n_done else "_No run has finished yet._",
        "",
    ]
    if plots:
        lines += ["## Plots", "", "Lines: mean over seeds; bands: 95% t-interval over seeds.", ""]
        for title, p in plots:
            lines += [f"### {title}", "", f"![{title}]({p.relative_to(plan.out).as_posix()})", ""]
    if plan.skipped:
        lines += ["## Skipped combinations", "", "| algorithm | env | why |", "|---|---|---|"]
        lines += [f"| {a} | {e} | {reason.replace('|', '/')} |" for a, e, reason in plan.skipped]
        lines += [""]
    missing = [j for j in plan.jobs if j.state != "done"]
    if missing:
        lines += ["## Unfinished runs", "",
                  "Rerun the same command to resume them (finished runs are skipped).", ""]
        fail = {id(j): t for j, t in failed}
        for j in missing:
            why = "failed, log tail:\n\n```\n" + fail[id(j)] + "\n```" if id(j) in fail else "not finished"
            lines += [f"- {j.algo} on {j.env}, seed {j.seed} (`{j.run_dir.relative_to(plan.out)}`): {why}"]
        lines += [""]
    lines += [
        "## Metric definitions",
        "",
        "From `shared/specs/progressive.md` (design document, section 5.3); evaluation points are the "
        "periodic greedy evaluations of each run.",
        "",
        "- **final return**: mean evaluation team return (sum over agents) over the last 10% of evaluations.",
        "- **constraint sat.**: share of evaluation episodes (all of training) whose episode cost is at most "
        "the cost limit (safe tasks only).",
        "- **T_conv**: env steps until the smoothed return (centered mean of 5 evaluations) first gets 90% of "
        "the way from its initial to its final value.",
        "- **eta** = (R_final - R_initial) / T_conv, shown per million env steps.",
        "- **sigma**: standard deviation of the evaluation returns over training (the seed's definition), "
        "and over the last 10% of evaluations.",
        "- **rho**: mean over agent pairs of the Pearson correlation of the per-step log-probabilities of the "
        "actions taken, over the last 10% of evaluations; n/a for policies without log-probabilities "
        "(MADDPG's deterministic actors, QMIX's greedy Q). †: greedy continuous actions have a constant "
        "log-probability, so there rho is computed over the training rollouts (sampled actions) of the "
        "same last 10% of training.",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line
def _estimate(plan: Plan, workers: int) -> float:
    """Expected wall seconds of the runs left, from :data:`THROUGHPUT`."""
    from pamarl.algos.onpolicy import OnPolicyAlgorithm
    from pamarl.algos.registry import get_algorithm

    total = 0.0
    for j in plan.jobs:
        if j.state == "done":
            continue
        kind = "onpolicy" if issubclass(get_algorithm(j.algo), OnPolicyAlgorithm) else "offpolicy"
        total += (j.steps - j.done_steps) / expected_throughput(kind, j.env) + 5.0  # + process start
    return total / max(1, min(workers, os.cpu_count() or 1))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pamarl compare",
        description="Run algorithms x envs x seeds in parallel processes and write OUT/report.md (table and "
        "plots), summary.csv and runs.csv. Rerunning the same command resumes: finished runs are skipped.",
        epilog="Presets: " + "; ".join(f"{k}: {v.description}" for k, v in PRESETS.items()),
    )
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named experiment (other options override it)")
    p.add_argument("--algos", help="comma-separated algorithm names (pamarl list)")
    p.add_argument("--envs", help="comma-separated env ids")
    p.add_argument("--seeds", help="number of seeds (3: seeds 1,2,3) or a comma-separated list (default 3)")
    p.add_argument("--steps", type=int, help="env steps per run (default: the preset's, else 100000)")
    p.add_argument("--out", required=True, help="output directory (runs/, report.md, summary.csv, plots/)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="training processes at once (default: the number of CPU cores)")
    p.add_argument("--evals", type=int,
                   help=f"evaluations per run when eval_every is not set (default {DEFAULT_EVALS})")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the expected running time; run nothing")
    p.add_argument("--report-only", action="store_true", help="write the report from the runs already finished")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="[ALGO:]key=value",
                   help="config keys for every run, or for one algorithm's runs with ALGO:key=value")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    preset = PRESETS[args.preset] if args.preset else None
    algos = _split_list(args.algos) if args.algos else list(preset.algos if preset else [])
    if not algos:
        raise UsageError("say which algorithms to compare: --algos a,b,c (or --preset smoke|paper)")
    if args.envs:
        env_plans = [EnvPlan(e, args.steps or 100_000) for e in _split_list(args.envs)]
    elif preset:
        env_plans = [dataclasses.replace(e, steps=args.steps or e.steps) for e in preset.envs]
    else:
        raise UsageError("say which envs to compare on: --envs id1,id2 (or --preset smoke|paper)")
    if args.steps is not None and args.steps < 1:
        raise UsageError("--steps must be >= 1")
    if args.workers < 1:
        raise UsageError("--workers must be >= 1")
    if args.evals is not None and args.evals < 1:
        raise UsageError(f"--evals must be >= 1, got {args.evals}")
    seeds = _parse_seeds(args.seeds) if args.seeds else list(range(1, (preset.seeds if preset else 3) + 1))
    common, scoped = _parse_overrides(args.overrides, algos)
    if preset:
        common = {**preset.overrides, **common}
        for a, ov in preset.algo_overrides.items():
            if a in algos:
                scoped[a] = {**ov, **scoped.get(a, {})}
    evals = args.evals or (preset.evals if preset else DEFAULT_EVALS)
    out = Path(args.out)
    plan = build_plan(out, algos, env_plans, seeds, common, scoped, evals)
    for j in plan.jobs:
        inspect_job(j)
    # The command that reproduces this report: rerunning it trains what is missing and rewrites the report,
    # so flags that change neither the runs nor the numbers are left out of what the report shows.
    command = "pamarl compare " + shlex.join([a for a in argv if a not in ("--report-only", "--quiet")])

    if not args.report_only and not args.dry_run:
        from pamarl.rundir import is_locked

        for j in plan.jobs:
            holder = None if j.state == "done" else is_locked(j.run_dir)
            if holder:
                raise UsageError(f"{j.run_dir} is being trained by {holder}: is another `pamarl compare` writing "
                                 f"{out}? Wait for it, or use --report-only")
    n_done = sum(j.state == "done" for j in plan.jobs)
    n_resume = sum(j.state == "resume" for j in plan.jobs)
    print(f"pamarl compare: {len(plan.jobs)} runs ({len(algos)} algorithms x {len(env_plans)} envs x "
          f"{len(seeds)} seeds, less {len(plan.skipped)} skipped combinations); {n_done} finished, "
          f"{n_resume} to resume, {len(plan.jobs) - n_done - n_resume} to start; output in {out}")
    for a, e, why in plan.skipped:
        print(f"  skip {a} on {e}: {why}")
    est = _estimate(plan, args.workers)
    if args.dry_run:
        for j in plan.jobs:
            print(f"  {j.state:<6} {j.algo:<12} {j.env:<48} seed {j.seed}  {j.steps:,} steps  {j.run_dir}")
        print(f"expected running time: about {_human(est)} with {args.workers} workers on {os.cpu_count()} cores "
              "(throughputs measured on a 2-core machine; see benchmarks/README.md)")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    failed: list[tuple[Job, str]] = []
    if not args.report_only and n_done < len(plan.jobs):
        print(f"expected running time: about {_human(est)}")
        try:
            _, failed = run_jobs(plan.jobs, args.workers, quiet=args.quiet)
        except KeyboardInterrupt:
            write_report(plan, command, time.perf_counter() - t0)
            print(f"\npamarl compare: interrupted; partial report in {out / 'report.md'}. "
                  "Rerun the same command to resume.", file=sys.stderr)
            return 130
    rep = write_report(plan, command, None if args.report_only else time.perf_counter() - t0, failed)
    print()
    print(rep.table)
    print(f"\nreport: {rep.path}  (summary.csv, runs.csv, {len(rep.plots)} plots in {out / 'plots'})")
    if failed:
        print(f"pamarl compare: {len(failed)} runs failed (see the report); rerun the command to retry them",
              file=sys.stderr)
        return 1
    return 0


def _human(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


if __name__ == "__main__":
    sys.exit(main())
