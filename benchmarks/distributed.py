"""Measurements of the Ray backends (benchmarks/README.md, "Distributed"): the averaging DQN against IQL at
equal total env steps, a sync_every sweep, and the scaling efficiency thr(N) / (N * thr(1)) of the averaging
DQN's learners, of Ray env workers and of Ray rollout workers (MAPPO).

    PYTHONPATH=src python benchmarks/distributed.py learning --total 40000 --out /tmp/dist
    PYTHONPATH=src python benchmarks/distributed.py scaling --out /tmp/dist
    PYTHONPATH=src python benchmarks/distributed.py rollout --steps 4000 --out /tmp/dist

Each configuration is one ordinary training run (its directory under --out); the table printed at the end
is computed from the runs' summary.json and metrics.csv. One seed per configuration: differences in return
smaller than the run-to-run spread of IQL on this task (several units) mean nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

from pamarl.runner import build_configs, train

SPREAD = "mpe/simple_spread_v3"
# The off-policy learning tests' MPE settings (tests/test_offpolicy.py): a shorter horizon, a faster learning
# rate and 3-step returns, so that progress shows within a small budget.
LEARN = {"gamma": 0.95, "lr": 1e-3, "n_step": 3, "tau": 0.005}


def run(out: Path, name: str, values: dict[str, Any]) -> dict[str, Any]:
    d = out / name
    if (d / "summary.json").exists():  # rerunning the script skips finished runs
        s = json.loads((d / "summary.json").read_text())
    else:
        r, a = build_configs({"env": SPREAD, "num_envs": 8, "rollout_len": 25, "eval_episodes": 32,
                              "tensorboard": False, "progress": False, "checkpoint_every": 0, "run_dir": str(d),
                              **values})
        train(r, a, quiet=True)
        s = json.loads((d / "summary.json").read_text())
    with open(d / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    total = float(rows[-1].get("train/env_steps_total") or s["env_steps"])
    shares = [float(r["time/sync_share"]) for r in rows if r.get("time/sync_share")]
    share = sum(shares) / len(shares) if shares else None
    # Steady state: from the end of the first iteration (workers started, first weights sent) to the last.
    steady = ((float(rows[-1]["env_steps"]) - float(rows[0]["env_steps"]))
              / max(float(rows[-1]["wall_s"]) - float(rows[0]["wall_s"]), 1e-9) if len(rows) > 1 else None)
    return {"name": name, "return": s.get("eval/return_mean"), "wall_s": s["wall_s"], "env_steps": total,
            "thr": total / s["wall_s"], "sync_share": share, "steady": steady}


def learning(out: Path, total: int) -> list[dict[str, Any]]:
    rows = [run(out, "iql", {"algo": "iql", "steps": total, "eps_anneal_steps": total // 4, **LEARN})]
    for n, sync in ((2, 100), (4, 100), (2, 10), (2, 500)):
        per = total // n
        rows.append(run(out, f"dqn_avg_n{n}_s{sync}", {
            "algo": "dqn_avg", "steps": per, "n_learners": n, "sync_every": sync, "backend": "ray",
            "cpus_per_learner": 1.0 if n <= 2 else 0.5,  # 4 learners on 2 cores: oversubscribed
            "eps_anneal_steps": per // 4, **LEARN}))
    return rows


def scaling(out: Path, steps: int) -> list[dict[str, Any]]:
    rows = []
    for n in (1, 2):  # per-learner budget fixed: N learners do N times the work
        rows.append(run(out, f"scale_dqn_avg_n{n}", {"algo": "dqn_avg", "steps": steps, "n_learners": n,
                                                     "backend": "ray", "eval_episodes": 1, **LEARN}))
    for w in (0, 1, 2):
        extra = {"env_workers": w, "env_backend": "ray"} if w else {}
        rows.append(run(out, f"scale_mappo_envw{w}", {"algo": "mappo", "steps": 8 * steps, "rollout_len": 200,
                                                      "eval_episodes": 1, **extra}))
    return rows


def rollout(out: Path, steps: int) -> list[dict[str, Any]]:
    """MAPPO with W = 1, 2 Ray rollout workers against the learner acting on in-process envs (same budget)."""
    rows = [run(out, "rollout_mappo_local", {"algo": "mappo", "steps": 8 * steps, "rollout_len": 200,
                                             "eval_episodes": 1})]
    for w in (1, 2):
        rows.append(run(out, f"rollout_mappo_w{w}", {"algo": "mappo", "steps": 8 * steps, "rollout_len": 200,
                                                     "eval_episodes": 1, "rollout_workers": w, "env_backend": "ray"}))
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("learning", "scaling", "rollout"))
    p.add_argument("--out", required=True)
    p.add_argument("--total", type=int, default=40_000, help="learning: total env steps of every configuration")
    p.add_argument("--steps", type=int, default=4_000, help="scaling: env steps per learner")
    a = p.parse_args()
    out = Path(a.out)
    what = {"learning": lambda: learning(out, a.total), "scaling": lambda: scaling(out, a.steps),
            "rollout": lambda: rollout(out, a.steps)}
    rows = what[a.what]()
    print("| run | eval return | wall s | total env steps | env steps/s | steady env steps/s | sync share |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ret = "n/a" if r["return"] is None else f"{r['return']:.1f}"
        sh = "" if r["sync_share"] is None else f"{r['sync_share']:.2f}"
        st = "" if r["steady"] is None else f"{r['steady']:.0f}"
        print(f"| {r['name']} | {ret} | {r['wall_s']:.0f} | {r['env_steps']:,.0f} | {r['thr']:.0f} | {st} | {sh} |")


if __name__ == "__main__":
    main()
