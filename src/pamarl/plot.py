"""Learning-curve plots: ``pamarl plot RUN_DIR...`` and the figures of ``pamarl compare``'s report.

Runs of the same algorithm on the same env are seeds of one curve: the line is the mean over seeds
and the band its 95% Student-t interval (min-max would grow with the number of seeds; the t interval
is what the report's table gives too). Seeds are aligned on the env steps of the shortest run
(linear interpolation where their evaluation points differ). One panel per env.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pamarl.errors import UsageError
from pamarl.results import RunData, find_runs, load_run

METRICS = {
    "return": ("eval/return_mean", "evaluation team return"),
    "train_return": ("train/return_mean", "training team return"),
    "cost": ("eval/cost_mean", "evaluation episode cost"),
    "train_cost": ("cost/episode_mean", "training episode cost"),
    "coordination": ("eval/coordination", "coordination rho"),
    "alpha": ("sched/alpha", "critical share alpha"),
    "k": ("sched/k", "critical agents k"),
}
"""Short names accepted by ``--metric`` (any ``metrics.csv`` column works too)."""
FORMATS = ("png", "pdf", "svg", "jpg", "jpeg", "eps", "ps", "tif", "tiff", "webp")
"""File types ``--out`` may end with (matplotlib's writers that need no extra package)."""


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    return plt


def slug(text: str) -> str:
    """A file-name-safe version of an env id or label."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def seed_band(curves: Sequence[tuple[np.ndarray, np.ndarray]], smooth: int = 1,
              confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean and ``confidence`` t-interval over seeds of curves ``(x, y)``, on a common x grid.

    Returns ``(x, mean, low, high)``; with one seed, low = high = mean. ``smooth`` > 1 applies a
    trailing moving average of that many points to each seed first (:func:`pamarl.metrics.smooth`).
    """
    from pamarl.metrics import smooth as smooth_fn
    from pamarl.metrics import t_quantile

    curves = [(x, y) for x, y in curves if x.size > 0]
    if not curves:
        raise UsageError("no data points to plot")
    ref = min(curves, key=lambda c: c[0][-1])[0]  # the grid of the shortest run
    ys = []
    for x, y in curves:
        if smooth > 1:
            y = smooth_fn(y, window=smooth, method="trailing")
        ys.append(np.interp(ref, x, y) if x.size > 1 else np.full(ref.shape, y[0]))
    arr = np.stack(ys)
    mean = arr.mean(axis=0)
    n = arr.shape[0]
    if n < 2:
        return ref, mean, mean, mean
    half = t_quantile(0.5 + confidence / 2, n - 1) * arr.std(axis=0, ddof=1) / math.sqrt(n)
    return ref, mean, mean - half, mean + half


def group(runs: Sequence[RunData]) -> dict[str, dict[str, list[RunData]]]:
    """``{env: {algo: [runs...]}}`` in first-seen order."""
    out: dict[str, dict[str, list[RunData]]] = {}
    for r in runs:
        out.setdefault(r.env, {}).setdefault(r.algo, []).append(r)
    return out


def _color(i: int) -> str:
    return f"C{i % 10}"


def plot_metric(runs: Sequence[RunData], key: str, ylabel: str, out: str | Path, *, title: str | None = None,
                smooth: int = 1, limit_line: bool = False, algo_order: Sequence[str] | None = None) -> Path | None:
    """Draw ``key`` against env steps for ``runs``: one panel per env, one line (+ seed band) per algorithm.

    With ``limit_line``, each panel also draws the runs' cost limit. Returns the PNG path, or None
    when no run logged ``key``.
    """
    grouped = group([r for r in runs if r.column(key)[0].size > 0])
    if not grouped:
        return None
    plt = _pyplot()
    n = len(grouped)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    order = list(algo_order or [])
    for a in (a for algos in grouped.values() for a in algos):
        if a not in order:
            order.append(a)
    for ax, (env, algos) in zip(axes.flat, grouped.items()):
        for algo, rs in sorted(algos.items(), key=lambda kv: order.index(kv[0])):
            x, m, lo, hi = seed_band([r.column(key) for r in rs], smooth=smooth)
            c = _color(order.index(algo))
            ax.plot(x, m, color=c, label=f"{algo} ({len(rs)} seed{'s' if len(rs) > 1 else ''})", lw=1.6)
            if len(rs) > 1:
                ax.fill_between(x, lo, hi, color=c, alpha=0.2, lw=0)
        if limit_line:
            limits = sorted({r.cost_limit for rs in algos.values() for r in rs if r.cost_limit is not None})
            for lim in limits:
                ax.axhline(lim, color="k", ls="--", lw=1.0, label=f"cost limit {lim:g}")
        ax.set_title(env, fontsize=10)
        ax.set_xlabel("env steps")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_schedule(runs: Sequence[RunData], out: str | Path) -> Path | None:
    """alpha and k over training for progressive-family runs (one row per env); None if none logged them."""
    sched = [r for r in runs if r.column("sched/alpha")[0].size > 0]
    if not sched:
        return None
    grouped = group(sched)
    plt = _pyplot()
    fig, axes = plt.subplots(len(grouped), 2, figsize=(10.4, 3.7 * len(grouped)), squeeze=False)
    order: list[str] = []
    for (env, algos), (ax_a, ax_k) in zip(grouped.items(), axes):
        for algo, rs in algos.items():
            if algo not in order:
                order.append(algo)
            c = _color(order.index(algo))
            r = rs[0]  # alpha and k follow the iteration count only: identical over seeds
            ax_a.plot(*r.column("sched/alpha"), color=c, label=algo)
            ax_k.step(*r.column("sched/k"), where="post", color=c, label=f"{algo} (N={r.n_agents})")
        # Env ids can be long (safe-mamujoco/...?episode_limit=200): two-line titles keep panels apart.
        ax_a.set_title(f"{env}\ncritical share alpha", fontsize=9)
        ax_k.set_title(f"{env}\ncritical agents k = max(1, floor(N alpha))", fontsize=9)
        for ax, yl in ((ax_a, "alpha"), (ax_k, "k")):
            ax.set_xlabel("env steps")
            ax.set_ylabel(yl)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        ax_a.set_ylim(0, 1.05)
        from matplotlib.ticker import MaxNLocator

        ax_k.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax_k.set_ylim(0, max(r.n_agents for rs in algos.values() for r in rs) + 0.5)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="pamarl plot",
        description="Plot learning curves of runs: seeds of the same algorithm and env become one line with a "
        "95%% confidence band; one panel per env.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run directories, or folders holding them (e.g. a `pamarl compare` output)")
    p.add_argument("--metric", default="return",
                   help=f"what to plot: {', '.join(METRICS)} or any metrics.csv column (default: return)")
    p.add_argument("--out", default="curves.png", help="PNG file to write (default: curves.png)")
    p.add_argument("--smooth", type=int, default=1, help="trailing moving average over this many points")
    p.add_argument("--title", help="figure title")
    args = p.parse_args(argv)
    if args.smooth < 1:
        raise UsageError("--smooth must be >= 1")
    ext = Path(args.out).suffix.lower().lstrip(".")
    if ext not in FORMATS:
        raise UsageError(f"--out {args.out!r}: matplotlib cannot write {ext or 'a file without an extension'!r}; "
                         f"end the name with one of .{', .'.join(FORMATS)}")
    runs = [load_run(d) for d in find_runs(args.runs)]
    key, ylabel = METRICS.get(args.metric, (args.metric, args.metric))
    if args.metric in ("alpha", "k"):
        path = plot_schedule(runs, args.out)
    else:
        path = plot_metric(runs, key, ylabel, args.out, title=args.title, smooth=args.smooth,
                           limit_line=key in ("eval/cost_mean", "cost/episode_mean"))
    if path is None:
        known = sorted({k for r in runs for k in (r.rows[0] if r.rows else {})})
        raise UsageError(f"none of the {len(runs)} runs logged {key!r}; logged columns: {', '.join(known)}")
    print(f"wrote {path} ({len(runs)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
