"""``pamarl bench``: training throughput next to the raw env speed, and peak memory.

Throughput is env steps per second (one step of E copies counts E). The raw figure steps the same
E copies with random actions and no learning, so the cost of learning is the gap between the two.
Training is also given per CPU second (the CPU time of the process, all threads, and of its env worker
processes), which a shared machine distorts far less than wall-clock time.
Peak memory is the maximum resident set size of this process (``getrusage``) and the largest resident set of
its child processes (env workers) while training, sampled from ``/proc`` every 0.2 s. (``getrusage``'s figure
for children is useless here: a spawned child is forked before it execs, so it reports the parent's size.)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch


def raw_env_speed(env_id: str, num_envs: int, workers: int, steps: int, seed: int = 0, inline: bool = False) -> float:
    from pamarl.envs.registry import make_env

    env = make_env(env_id, num_envs=num_envs, workers=workers, seed=seed, inline=inline)
    spec = env.spec
    g = torch.Generator().manual_seed(seed)
    obs = env.reset(seed=seed)
    n_iter = max(1, steps // num_envs)
    t0 = time.perf_counter()
    for _ in range(n_iter):
        if spec.discrete:
            probs = obs.action_mask.float().reshape(-1, spec.act_dim)
            a = torch.multinomial(probs, 1, generator=g).reshape(num_envs, spec.n_agents)
        else:
            low, high = (torch.as_tensor(x) for x in spec.padded_bounds())
            a = low + torch.rand(num_envs, spec.n_agents, spec.act_dim, generator=g) * (high - low)
        obs = env.step(a).next
    dt = time.perf_counter() - t0
    env.close()
    return n_iter * num_envs / dt


def raw_engine_agent_steps(env_id: str, steps: int, seed: int = 0) -> float | None:
    """MAgent2 only: agent-steps (both teams) per CPU second of the bare engine under random actions
    (set_action / step / get_reward / get_observation / clear_dead per team, no wrapper, no learning)."""
    from pamarl.envs.registry import make_env, parse_env_id

    if parse_env_id(env_id)[0] != "magent2":  # magent2 is an optional extra: never import it otherwise
        return None
    from pamarl.envs.magent import MAgentEnv

    env = make_env(env_id, num_envs=1, seed=seed)
    if not isinstance(env, MAgentEnv):
        env.close()
        return None
    g, rng, n = env.copies[0].env, np.random.default_rng(seed), 0
    t0 = time.process_time()
    for _ in range(max(1, steps)):
        for h in env.handles:
            k = g.get_num(h)
            g.set_action(h, rng.integers(0, int(g.get_action_space(h)[0]), k).astype(np.int32))
            n += k
        done = g.step()
        for h in env.handles:
            g.get_reward(h)
            g.get_observation(h)
        g.clear_dead()
        if done or any(g.get_num(h) == 0 for h in env.handles):
            g.reset()
            env.copies[0].generate_map()
    dt = time.process_time() - t0
    env.close()
    return n / max(dt, 1e-9)


def _loop_steps_per_s(metrics_csv: Any) -> float:
    """Env steps per second of the training loop alone (collect + update), from the last row of a run's
    ``metrics.csv``: its ``wall_s`` is taken before the final evaluation and checkpoint, which on a large battle
    (one evaluation episode of up to ``max_cycles`` steps) can cost as much as the training being timed."""
    import csv

    with open(metrics_csv) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return float("nan")
    return float(rows[-1]["env_steps"]) / max(float(rows[-1]["wall_s"]), 1e-9)


class ChildMemory:
    """Samples the resident set of every live child process (Linux ``/proc``) in a thread; keeps the largest."""

    def __init__(self, period_s: float = 0.2):
        import threading

        self.largest_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period_s,), daemon=True)

    @staticmethod
    def _children() -> list[str]:
        import glob

        kids = []
        for f in glob.glob("/proc/self/task/*/children"):
            with open(f) as fh:
                kids += fh.read().split()
        return kids

    def _run(self, period_s: float) -> None:
        while not self._stop.wait(period_s):
            for pid in self._children():
                try:
                    with open(f"/proc/{pid}/status") as fh:
                        kb = next((int(x.split()[1]) for x in fh if x.startswith("VmRSS:")), 0)
                except OSError:  # it exited meanwhile
                    continue
                self.largest_kb = max(self.largest_kb, kb)

    def __enter__(self) -> ChildMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def peak_memory_mb(children: ChildMemory | None = None) -> dict[str, float]:
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = 0.0 if children is None else children.largest_kb / 1024
    return {"main_mb": round(me, 1), "largest_child_mb": round(kids, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pamarl bench", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--algo", default="mappo")
    p.add_argument("--env", default="mpe/simple_spread_v3")
    p.add_argument("--steps", type=int, default=48_000, help="training env steps to time")
    p.add_argument("--num-envs", type=int, default=8)
    p.add_argument("--rollout-len", type=int, default=200)
    p.add_argument("--workers", type=int, default=0, help="env subprocesses (0: in-process)")
    p.add_argument("--inline", action="store_true",
                   help="with --workers W: this process steps a share of the copies too (env_inline=true)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="algorithm config keys")
    args = p.parse_args(argv)

    from pamarl.config import parse_overrides
    from pamarl.runner import build_configs, train

    torch.set_num_threads(args.threads)
    raw = raw_env_speed(args.env, args.num_envs, args.workers, min(args.steps, 16_000), inline=args.inline)
    with tempfile.TemporaryDirectory() as d:
        values = {"algo": args.algo, "env": args.env, "steps": args.steps, "num_envs": args.num_envs,
                  "rollout_len": args.rollout_len, "env_workers": args.workers,
                  "env_inline": args.inline, "torch_threads": args.threads,
                  "eval_every": 0, "eval_episodes": 1, "checkpoint_every": 0, "tensorboard": False,
                  "progress": False, "run_dir": f"{d}/run", **parse_overrides(args.overrides)}
        run, algo_cfg = build_configs(values)
        torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # its lazy imports stay out of the CPU time
        def cpu_s() -> float:  # this process and its finished children (env workers are joined by train())
            t = os.times()
            return t.user + t.system + t.children_user + t.children_system

        cpu0 = cpu_s()
        with ChildMemory() as children:
            res = train(run, algo_cfg, quiet=True)
        cpu = cpu_s() - cpu0
        loop_rate = _loop_steps_per_s(res.run_dir / "metrics.csv")
    mem = peak_memory_mb(children)
    engine = raw_engine_agent_steps(args.env, 200)
    out = {
        "algo": args.algo, "env": args.env, "num_envs": args.num_envs, "rollout_len": args.rollout_len,
        "workers": args.workers, "inline": args.inline, "threads": args.threads, "train_env_steps": res.env_steps,
        "train_steps_per_s": round(res.steps_per_s, 1), "train_loop_steps_per_s": round(loop_rate, 1),
        "raw_env_steps_per_s": round(raw, 1),
        "train_steps_per_cpu_s": round(res.env_steps / cpu, 1),
        "learning_overhead": round(1 - res.steps_per_s / raw, 3), **mem,
        "config": {"epochs": algo_cfg.epochs, "minibatches": algo_cfg.minibatches, "hidden": list(algo_cfg.hidden)}
        if hasattr(algo_cfg, "epochs") else {},
    }
    if engine is not None:  # many-agent battles: count agent-steps (the learning team's agents per env step)
        n = res.n_agents
        out.update(train_agent_steps_per_s=round(res.steps_per_s * n, 1), raw_agent_steps_per_s=round(raw * n, 1),
                   train_loop_agent_steps_per_s=round(loop_rate * n, 1),
                   engine_agent_steps_per_cpu_s=round(engine, 1), learning_agents=n)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"pamarl bench: {args.algo} on {args.env}, {args.num_envs} envs x {args.rollout_len} steps, "
              f"workers={args.workers}{' inline' if args.inline else ''}, threads={args.threads} {out['config']}")
        print(f"  training : {out['train_steps_per_s']:>9,.0f} env steps/s ({res.env_steps:,} steps; "
              f"{out['train_steps_per_cpu_s']:,.0f} per CPU second of all threads and env workers, setup included; "
              "training loop "
              f"alone {out['train_loop_steps_per_s']:,.0f})")
        print(f"  raw env  : {out['raw_env_steps_per_s']:>9,.0f} env steps/s (random actions, no learning)")
        if engine is not None:
            print(f"  agent-steps/s: training {out['train_agent_steps_per_s']:,.0f} (training loop alone, without the "
                  f"final evaluation episode and checkpoint: {out['train_loop_agent_steps_per_s']:,.0f}), wrapper with "
                  "random actions "
                  f"{out['raw_agent_steps_per_s']:,.0f} ({out['learning_agents']} learning agents per env step); "
                  f"bare engine {engine:,.0f} per CPU second (both teams)")
        print(f"  peak RSS : {mem['main_mb']:,.0f} MB main process, {mem['largest_child_mb']:,.0f} MB largest child")
    return 0


if __name__ == "__main__":
    sys.exit(main())
