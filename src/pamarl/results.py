"""Reading finished runs back: learning curves and the experiment metrics of one run directory.

A run directory (written by :func:`pamarl.runner.train`) holds ``config.yaml``, ``metrics.csv`` (one
row per iteration, evaluation columns on evaluation rows), ``eval_episodes.jsonl`` (every evaluation
episode's team return and cost) and, once finished, ``summary.json``. :func:`load_run` turns it into
a :class:`RunData`; :func:`run_metrics_of` computes the design document's per-run metrics from it
(:func:`pamarl.metrics.run_metrics`). Used by ``pamarl compare`` and ``pamarl plot``; torch-free.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pamarl.errors import UsageError
from pamarl.logging import read_csv, read_jsonl
from pamarl.metrics import tail_count


@dataclass
class RunData:
    """One run's configuration and logged curves (NumPy arrays over evaluation points)."""

    run_dir: Path
    algo: str
    env: str
    seed: int
    n_agents: int
    has_cost: bool
    cost_limit: float | None
    rows: list[dict[str, str]]
    """``metrics.csv`` rows as strings (empty string: not logged on that iteration)."""
    eval_steps: np.ndarray
    """[T] env steps at each evaluation."""
    eval_returns: np.ndarray
    """[T] mean evaluation team return."""
    eval_episode_returns: np.ndarray | None = None
    """[T, E] team return of every evaluation episode (NaN padding), from ``eval_episodes.jsonl``."""
    eval_episode_costs: np.ndarray | None = None
    """[T, E] episode cost of every evaluation episode on tasks with a cost."""
    summary: dict[str, Any] = field(default_factory=dict)
    """``summary.json`` (empty while the run is unfinished)."""

    @property
    def label(self) -> str:
        return f"{self.algo} {self.env} seed {self.seed}"

    @property
    def env_steps(self) -> int:
        """Env steps done so far (last logged iteration)."""
        return int(float(self.rows[-1]["env_steps"])) if self.rows else 0

    def column(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """``(env_steps, values)`` of the iterations that logged ``key`` (numeric values only)."""
        xs, ys = [], []
        for r in self.rows:
            v = r.get(key, "")
            if v in ("", None):
                continue
            try:
                y = float(v)
            except ValueError:
                continue
            xs.append(float(r["env_steps"]))
            ys.append(y)
        return np.asarray(xs), np.asarray(ys)

    def has_column(self, key: str) -> bool:
        return bool(self.rows) and key in self.rows[0]


def _cost_limit(doc: dict[str, Any]) -> float | None:
    run = doc.get("run", {})
    if run.get("cost_limit") is not None:
        return float(run["cost_limit"])
    from pamarl.envs.registry import resolve

    try:
        fam, _, params = resolve(str(run["env"]))
    except UsageError:  # the env's extra is not installed here: fall back to the generic default
        return 25.0
    default = fam.cost_limit(params)
    return float(default) if default is not None else 25.0


def _padded(rows: list[list[float]]) -> np.ndarray:
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), max(width, 1)), np.nan)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def is_run_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.yaml").is_file() and (p / "metrics.csv").is_file()


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory; raise :class:`UsageError` naming what is missing."""
    d = Path(run_dir)
    if not (d / "config.yaml").is_file():
        raise UsageError(f"{str(d)!r} is not a pamarl run directory (no config.yaml)")
    if not (d / "metrics.csv").is_file():
        raise UsageError(f"run {str(d)!r} has not logged anything yet (no metrics.csv)")
    try:
        doc = yaml.safe_load((d / "config.yaml").read_text())
        run, spec = doc["run"], doc["env_spec"]
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise UsageError(f"{str(d / 'config.yaml')!r} is not a valid run config ({e})") from e
    rows = read_csv(d / "metrics.csv")
    has_cost = bool(spec.get("has_cost", False))
    data = RunData(run_dir=d, algo=str(run["algo"]), env=str(run["env"]), seed=int(run["seed"]),
                   n_agents=len(spec["agents"]), has_cost=has_cost,
                   cost_limit=_cost_limit(doc) if has_cost else None, rows=rows,
                   eval_steps=np.zeros(0), eval_returns=np.zeros(0))
    data.eval_steps, data.eval_returns = data.column("eval/return_mean")
    ep_path = d / "eval_episodes.jsonl"
    if ep_path.is_file():
        lines = read_jsonl(ep_path)
        by_step = {int(ln["env_steps"]): ln for ln in lines}
        if lines and all(int(s) in by_step for s in data.eval_steps):
            evals = [by_step[int(s)] for s in data.eval_steps]
            data.eval_episode_returns = _padded([ln.get("returns", []) for ln in evals])
            if has_cost:
                data.eval_episode_costs = _padded([ln.get("costs", []) for ln in evals])
    if (d / "summary.json").is_file():
        try:
            data.summary = json.loads((d / "summary.json").read_text())
        except json.JSONDecodeError:
            data.summary = {}
    return data


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories among ``paths``: each path is a run directory or a folder searched recursively."""
    found: list[Path] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise UsageError(f"{str(p)!r} does not exist")
        if is_run_dir(p):
            found.append(p)
            continue
        inner = sorted(c.parent for c in p.rglob("config.yaml") if is_run_dir(c.parent))
        if not inner:
            raise UsageError(f"{str(p)!r} is not a run directory and holds none (no config.yaml + metrics.csv)")
        found.extend(inner)
    return list(dict.fromkeys(found))


def _tail_mean(values: np.ndarray, last_frac: float) -> float:
    v = values[~np.isnan(values)] if values.size else values
    if v.size == 0:
        return math.nan
    return float(np.mean(v[-tail_count(v.size, last_frac):]))


def run_metrics_of(run: RunData, last_frac: float = 0.1) -> dict[str, float]:
    """The spec's per-run metrics from a run's evaluation log (:func:`pamarl.metrics.run_metrics`).

    Returns and costs are taken per evaluation episode when ``eval_episodes.jsonl`` is there (so the
    constraint satisfaction rate is the share of episodes), from the logged means otherwise.
    Coordination rho is the mean of the evaluations' ``eval/coordination`` over the last
    ``last_frac`` of evaluations (each is computed over all steps of that evaluation). Where that is
    undefined (greedy continuous actions have a constant log-probability) it is the mean of
    ``train/coordination`` (sampled actions of the training rollouts) over the same part of training,
    and ``rho_source`` is 1 (0: from evaluation). NaN for algorithms without action log-probabilities
    (deterministic actors, greedy Q).
    Also reported: ``env_steps``, ``wall_s`` and ``env_steps_per_s`` (from ``summary.json``).
    """
    from pamarl.metrics import run_metrics

    if run.eval_steps.size == 0:
        raise UsageError(f"run {str(run.run_dir)!r} has no evaluation yet")
    returns = run.eval_episode_returns if run.eval_episode_returns is not None else run.eval_returns
    costs: np.ndarray | None = None
    if run.has_cost:
        if run.eval_episode_costs is not None:
            costs = run.eval_episode_costs
        else:
            steps_c, c = run.column("eval/cost_mean")
            costs = c if steps_c.size == run.eval_steps.size else None
    out = run_metrics(run.eval_steps, returns, costs=costs, cost_limit=run.cost_limit, last_frac=last_frac)
    _, rho = run.column("eval/coordination")
    out["rho"] = _tail_mean(rho, last_frac)
    out["rho_source"] = 0.0
    if not math.isfinite(out["rho"]):
        # Greedy continuous actions have a constant log-probability, so the evaluation rho is undefined:
        # fall back to the training rollouts' sampled actions over the same last part of training.
        steps_t, rho_t = run.column("train/coordination")
        if rho_t.size:
            cut = run.eval_steps[-tail_count(run.eval_steps.size, last_frac)]
            tail = rho_t[steps_t >= cut]
            out["rho"] = _tail_mean(tail if tail.size else rho_t, 1.0)
            out["rho_source"] = 1.0 if math.isfinite(out["rho"]) else 0.0
    out["env_steps"] = float(run.summary.get("env_steps", run.env_steps))
    out["wall_s"] = float(run.summary.get("wall_s", math.nan))
    out["env_steps_per_s"] = float(run.summary.get("env_steps_per_s", math.nan))
    return out
