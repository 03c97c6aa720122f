"""The whole speed table in one run: raw env stepping (mpe2, pamarl's batched torch MPE, VMAS) and
pamarl training throughput (``pamarl bench``), with the machine, the versions and every command.

    PYTHONPATH=src .venv/bin/python benchmarks/speed_table.py            # everything (about 10-15 min)
    PYTHONPATH=src .venv/bin/python benchmarks/speed_table.py --only raw # env stepping only (about 1 min)
    PYTHONPATH=src .venv/bin/python benchmarks/speed_table.py --only mpe2 --harl-python ... --harl-src ...
                                                                  # the mpe2 path against HARL (about 6 min)

Raw stepping: one torch thread, random actions drawn up front (a pool of 16 batches cycled, so neither
side pays for its random numbers), the same simple_spread (N=3, 25-step episodes). pamarl's envs reset
automatically every 25 steps and keep episode statistics; VMAS is stepped without resets (its step does
not reset), which favours VMAS. VMAS is only used here (``pip install vmas``); rows whose package is
missing are printed as such. HARL runs in its own virtualenv (``../shared/reference/harl/``): pass
``--harl-python`` and ``--harl-src`` to add its rows: HARL runs before and after pamarl's mpe2 rows, and
the mpe2 rows print their ratio to the mean of the two HARL figures.

Training rows give the rate of the training loop alone (``train_loop_steps_per_s`` of ``pamarl bench
--json``: collection and updates, without process start-up and the final evaluation), as HARL's FPS does.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

Row = tuple[str, float | None, str]


def _timed(step: Callable[[int], Any], iters: int, warmup: int = 5) -> tuple[float, float]:
    """Wall and CPU seconds per call of ``step(i)`` over ``iters`` calls, after ``warmup`` calls. The CPU
    time of this (one-thread) process is what the figure would be on an idle core of a shared machine."""
    for i in range(warmup):
        step(i)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(iters):
        step(i)
    return (time.perf_counter() - t0) / iters, (time.process_time() - c0) / iters


def _iters(num_envs: int, budget: int) -> int:
    return max(10, budget // num_envs)


def raw_pamarl(env_id: str, num_envs: int, budget: int) -> tuple[float, float]:
    from pamarl.envs.registry import make_env

    env = make_env(env_id, num_envs=num_envs, seed=0)
    spec = env.spec
    env.reset(seed=0)
    g = torch.Generator().manual_seed(0)
    pool = [torch.randint(0, spec.act_dim, (num_envs, spec.n_agents), generator=g) for _ in range(16)]
    wall, cpu = _timed(lambda i: env.step(pool[i % 16]), _iters(num_envs, budget))
    env.close()
    return num_envs / wall, num_envs / cpu


def raw_vmas(num_envs: int, budget: int) -> tuple[float, float]:
    import vmas

    env = vmas.make_env("simple_spread", num_envs=num_envs, device="cpu", continuous_actions=False, seed=0,
                        n_agents=3)
    env.reset()
    g = torch.Generator().manual_seed(0)
    pool = [[torch.randint(0, 5, (num_envs,), generator=g) for _ in range(3)] for _ in range(16)]
    wall, cpu = _timed(lambda i: env.step(pool[i % 16]), _iters(num_envs, budget))
    return num_envs / wall, num_envs / cpu


def bench_row(args: list[str]) -> Row:
    cmd = [sys.executable, "-m", "pamarl.cli", "bench", "--json", *args]
    shown = "pamarl bench " + " ".join(shlex.quote(a) for a in args)
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return shown, None, f"failed: {out.stderr.strip().splitlines()[-1:]}"
    res = json.loads(out.stdout[out.stdout.index("{"):])
    note = (f"{res['train_steps_per_cpu_s']:,.0f} per CPU second (all threads and env workers); "
            f"raw env in the same config {res['raw_env_steps_per_s']:,.0f}")
    return shown, float(res["train_loop_steps_per_s"]), note


def harl_row(python: str, src: str, steps: int) -> Row:
    here = os.path.dirname(os.path.abspath(__file__))
    script = os.path.join(here, "..", "..", "shared", "reference", "harl", "harl_train.py")
    args = ["--algo", "happo", "--env", "pettingzoo_mpe", "--exp_name", "bench", "--scenario", "simple_spread_v3",
            "--continuous_actions", "False", "--n_rollout_threads", "8", "--episode_length", "200",
            "--num_env_steps", str(steps), "--ppo_epoch", "5", "--critic_epoch", "5", "--actor_num_mini_batch", "1",
            "--critic_num_mini_batch", "1", "--hidden_sizes", "[128,128]", "--torch_threads", "1", "--cuda", "False",
            "--seed", "1", "--use_eval", "False", "--log_dir", "/tmp/harl_bench"]
    t0 = time.perf_counter()
    out = subprocess.run([python, script, *args], capture_output=True, text=True, env={**os.environ, "HARL_SRC": src})
    wall = time.perf_counter() - t0
    shown = f"HARL_SRC={src} {python} harl_train.py " + " ".join(shlex.quote(a) for a in args)
    fps = re.findall(r"FPS (\d+)", out.stdout)
    if out.returncode != 0 or not fps:
        return shown, None, f"failed (rc {out.returncode}); wall {wall:.0f} s"
    return shown, float(fps[-1]), "HARL's own FPS, last update"


def versions() -> str:
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for mod in ("pamarl", "mpe2", "vmas"):
        try:
            m = importlib.import_module(mod)
            parts.append(f"{mod} {getattr(m, '__version__', '?')}")
        except ImportError:
            parts.append(f"{mod} (not installed)")
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        parts.append(f"pamarl git {rev}")
    except OSError:
        pass
    return ", ".join(parts)


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, load average {load:.1f} at start"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--only", choices=["raw", "train", "mpe2"], default=None)
    p.add_argument("--budget", type=int, default=400_000, help="env steps per raw-stepping row")
    p.add_argument("--train-steps", type=int, default=307_200, help="env steps per training row (mpe2 rows: a quarter)")
    p.add_argument("--harl-python", default=None)
    p.add_argument("--harl-src", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows: list[Row] = []
    if args.only in (None, "raw"):
        cases: list[tuple[str, Callable[[], tuple[float, float]]]] = [
            ("raw mpe/simple_spread_v3 (mpe2, fast path), 8 copies", lambda: raw_pamarl("mpe/simple_spread_v3", 8,
                                                                                     args.budget // 40)),
        ]
        for e in (1024, 16384):
            for dt in ("float64", "float32"):
                cases.append((f"raw mpe-torch/simple_spread_v3?dtype={dt}, {e} copies",
                              lambda e=e, dt=dt: raw_pamarl(f"mpe-torch/simple_spread_v3?dtype={dt}", e, args.budget)))
            cases.append((f"raw VMAS simple_spread, {e} copies", lambda e=e: raw_vmas(e, args.budget)))
        for name, fn in cases:
            try:
                wall, cpu = fn()
                rows.append((name, wall, f"1 torch thread, random actions; {cpu:,.0f} per CPU second"))
            except ImportError as err:
                rows.append((name, None, f"not installed ({err.name})"))
    if args.only in (None, "train", "mpe2"):
        quarter = str(args.train_steps // 4)
        harl = args.harl_python and args.harl_src
        if harl:
            rows.append(harl_row(args.harl_python, args.harl_src, args.train_steps // 4))
        mpe2: list[Row] = []
        for algo in ("happo", "mappo"):
            # The mpe2 path in HARL's side-by-side configuration (8 envs x 200, 5 epochs, 1 minibatch): one
            # process on one thread, then the second core: the env copies shared with one worker process
            # (env_inline) and/or 2 torch threads for the update.
            for extra in (["--threads", "1"], ["--threads", "2"], ["--workers", "1", "--inline", "--threads", "1"],
                          ["--workers", "1", "--inline", "--threads", "2"]):
                mpe2.append(bench_row(["--algo", algo, "--env", "mpe/simple_spread_v3", "--steps", quarter, *extra]))
        if harl:
            rows.append(harl_row(args.harl_python, args.harl_src, args.train_steps // 4))
            got = [v for _, v, _ in rows[-2:] if v is not None]
            if got:
                ref = sum(got) / len(got)
                mpe2 = [(n, v, f"{note}; {v / ref:.2f}x HARL" if v is not None else note) for n, v, note in mpe2]
        else:
            rows.append(("HARL happo, mpe2 simple_spread (8 x 200)", None,
                         "not run: give --harl-python and --harl-src (see shared/reference/harl/)"))
        rows[-1:-1] = mpe2
    if args.only in (None, "train"):
        s = str(args.train_steps)
        for algo in ("happo", "mappo"):
            # The batched torch MPE: 128 x 25 with one minibatch (issue 15 item 2's configuration: it learns per env
            # step at least as the mpe2 path does, benchmarks/README.md), 128 x 50 with 4 minibatches (1,600 samples
            # per gradient step as on the mpe2 path), and a large-batch configuration.
            for e, t, mb in ((128, 25, 1), (128, 50, 4), (1024, 50, 1)):
                for threads in (1, 2):
                    rows.append(bench_row(["--algo", algo, "--env", "mpe-torch/simple_spread_v3", "--num-envs", str(e),
                                           "--rollout-len", str(t), "--steps", s, "--threads", str(threads),
                                           f"minibatches={mb}"]))
    print(f"machine: {machine()}")
    print(f"versions: {versions()}")
    print(f"command: {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}\n")
    print("| what | env steps/s | notes |\n| --- | --- | --- |")
    for name, v, note in rows:
        print(f"| {name} | {'-' if v is None else f'{v:,.0f}'} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
