"""The report of ``pamarl compare``: ``OUT/report.md`` (table, plots, skipped and unfinished runs, metric
definitions), ``summary.csv`` (aggregates over seeds) and ``runs.csv`` (one row per run).

Computed from the runs' logged evaluations with :mod:`pamarl.metrics`; the run directories are the only
input, so the report can be rewritten at any time (``pamarl compare ... --report-only``).
"""

from __future__ import annotations

import csv
import io
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pamarl.distributed.launch import retries_of
from pamarl.plot import slug

if TYPE_CHECKING:
    from pamarl.compare import Job, Plan


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
        + (f", {human(train_s)} of training-process time in all (sum of the runs' wall_s)." if train_s else "."),
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
    retried = [(j, r) for j in plan.jobs for r in retries_of(j.run_dir)]
    if retried:
        lines += ["## Retried runs", "",
                  "Runs whose process or node died and that the Ray backend restarted from their last checkpoint "
                  "(`attempts.jsonl` in the run directory):", ""]
        for j, r in retried:
            how = (f"resumed at {r['from_env_steps']:,} env steps" if r["state"] == "resume"
                   else "started over (no checkpoint yet)")
            lines += [f"- {j.algo} on {j.env}, seed {j.seed}: restarted {r['time']} on {r['node']}, {how}"]
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




def human(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"

