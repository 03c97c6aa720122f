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

With ``--backend ray [--address auto|HOST:PORT] [--cpus-per-run C]`` the runs are Ray tasks on a cluster
instead (:mod:`pamarl.distributed.launch`): same run directories, report and resume; a run whose process
or node dies is retried from its last checkpoint (``--max-retries``) and the report lists it. ``--out`` must
then be on storage that every node reaches at the same path (NFS or similar).

Resumable: rerunning the same command skips finished runs, resumes interrupted ones from their last
checkpoint and extends finished ones when ``--steps`` grew. A run directory trained with other
settings is an error (use another ``--out``), so one report never mixes configurations.

The report (``OUT/report.md``, ``summary.csv``, ``runs.csv``, ``plots/*.png``; written by :mod:`pamarl.report`)
is computed from the runs' logged evaluations with :mod:`pamarl.metrics`: final return, constraint
satisfaction rate, convergence steps T_conv, learning efficiency eta, stability sigma (whole run and last
10%) and coordination rho, per run and over seeds (mean with a 95% t-interval; IQM with a bootstrap interval).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pamarl.compare_presets import (  # noqa: F401 - the presets and throughputs are part of compare's API
    DEFAULT_EVALS,
    PRESETS,
    THROUGHPUT,
    EnvPlan,
    Preset,
    expected_throughput,
)
from pamarl.distributed.launch import Launcher, RayLauncher, run_jobs
from pamarl.errors import UsageError
from pamarl.plot import slug
from pamarl.report import human as _human
from pamarl.report import write_report

IGNORED_IN_CHECK = ("steps", "run_dir", "progress", "tensorboard", "env_workers", "env_inline", "env_backend",
                    "torch_threads")
"""Config keys that may differ between a run on disk and the planned one (they do not change results,
or, for ``steps``, are handled by extending the run)."""


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


# ----------------------------------------------------------------------------- command line
def _estimate(plan: Plan, slots: int) -> float:
    """Expected wall seconds of the runs left with ``slots`` runs at once, from :data:`THROUGHPUT`."""
    from pamarl.algos.onpolicy import OnPolicyAlgorithm
    from pamarl.algos.registry import get_algorithm

    total = 0.0
    for j in plan.jobs:
        if j.state == "done":
            continue
        kind = "onpolicy" if issubclass(get_algorithm(j.algo), OnPolicyAlgorithm) else "offpolicy"
        total += (j.steps - j.done_steps) / expected_throughput(kind, j.env) + 5.0  # + process start
    return total / max(1, slots)


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
    p.add_argument("--workers", type=int,
                   help="runs at once (default: the number of CPU cores; with --backend ray: as many as the "
                   "cluster's CPUs hold)")
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="local: training subprocesses on this machine (default); ray: Ray tasks on a cluster")
    p.add_argument("--address", help="with --backend ray: the cluster to join (auto, or HOST:PORT of `ray start "
                   "--head`); default: start a Ray instance on this machine. --out must be on storage every "
                   "node reaches at the same path (NFS or similar)")
    p.add_argument("--cpus-per-run", type=float, default=1.0,
                   help="with --backend ray: CPUs reserved per run (default 1; torch uses that many threads)")
    p.add_argument("--max-retries", type=int, default=3,
                   help="with --backend ray: times a run whose process or node died is retried from its last "
                   "checkpoint (default 3)")
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
    if args.workers is not None and args.workers < 1:
        raise UsageError("--workers must be >= 1")
    if args.evals is not None and args.evals < 1:
        raise UsageError(f"--evals must be >= 1, got {args.evals}")
    if args.backend == "local" and (args.address or args.cpus_per_run != 1.0):
        raise UsageError("--address and --cpus-per-run apply to --backend ray; add --backend ray")
    if args.cpus_per_run <= 0 or args.max_retries < 0:
        raise UsageError("--cpus-per-run must be > 0 and --max-retries >= 0")
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
    launcher: Launcher | None = None
    if args.backend == "ray" and not args.report_only:
        ray_launcher = RayLauncher(args.address, args.cpus_per_run, args.max_retries)
        launcher = ray_launcher
        cpus = float(ray_launcher.ray.cluster_resources().get("CPU", 1))
        slots = max(1, int(cpus // args.cpus_per_run))
        where = f"on a Ray cluster of {cpus:.0f} CPUs ({args.cpus_per_run:g} per run)"
    else:
        slots = min(args.workers or os.cpu_count() or 1, os.cpu_count() or 1)
        where = f"on {os.cpu_count()} cores"
    workers = args.workers or (slots if args.backend == "ray" else os.cpu_count() or 1)
    est = _estimate(plan, min(workers, slots))
    if args.dry_run:
        for j in plan.jobs:
            print(f"  {j.state:<6} {j.algo:<12} {j.env:<48} seed {j.seed}  {j.steps:,} steps  {j.run_dir}")
        print(f"expected running time: about {_human(est)} with {min(workers, slots)} runs at once {where} "
              "(throughputs measured on a 2-core machine; see benchmarks/README.md)")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    failed: list[tuple[Job, str]] = []
    if not args.report_only and n_done < len(plan.jobs):
        print(f"expected running time: about {_human(est)}")
        try:
            _, failed = run_jobs(plan.jobs, workers, quiet=args.quiet, launcher=launcher)
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




if __name__ == "__main__":
    sys.exit(main())
