"""Side-by-side learning measurement of pamarl and HARL on mpe2 tasks (issue 11, item 9).

Every run is HARL's MPE configuration: 8 envs x 200-step rollouts, 300k env steps (188 iterations =
300,800 steps; HARL is given ``--num_env_steps 300800`` so both do 188 updates), torch_threads 1, CPU.
The number reported per run is the mean *training* team return (the sum over agents of their episode
returns) of the last 5 iterations: pamarl's ``train/return_mean`` column of ``metrics.csv``; HARL's
"average episode reward" line, logged after every update (``--log_interval 1``), which is the same
team sum (HARL trains every agent on the summed reward). Over seeds: the mean and a 95% Student-t
interval (:func:`pamarl.metrics.mean_ci`).

Subcommands (run from the repository root):

``run``     train every algorithm x env x seed x variant that has no finished result under ``--out``
            (one process at a time; finished runs are reused), then print the table. ``--dry-run``
            prints the commands only.
``report``  the table from what is under ``--out``, no training.
``check-identity``  run with HARL's python: HARL's MPE wrapper against plain ``mpe2`` on the same
            seeds and random actions (observations, global state, team reward, episode ends).

Examples::

    PYTHONPATH=$PWD/src /work/main/.venv/bin/python benchmarks/parity_mpe.py run --out parity_runs \\
        --algos happo,mappo --envs mpe/simple_speaker_listener_v4,mpe/simple_reference_v3 --seeds 1,2,3 \\
        --variant default= --variant 'harl=--preset harl' \\
        --harl-python /work/harl/venv/bin/python --harl-src /work/harl/HARL --harl-algos happo
    /work/harl/venv/bin/python benchmarks/parity_mpe.py check-identity --harl-src /work/harl/HARL

HARL must be an mpe2-patched checkout in a venv of its own (``shared/reference/harl/README.md``); its
launcher ``harl_train.py`` is looked for in ``shared/reference/harl/`` of the repository root or of any
folder above it, or given with ``--harl-launcher``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

STEPS = 300_000
NUM_ENVS = 8
ROLLOUT_LEN = 200
LAST = 5
"""Iterations averaged at the end of each run."""


def harl_steps(steps: int) -> int:
    """HARL runs floor(num_env_steps / 1600) updates: give it pamarl's ceil(steps / 1600) x 1600."""
    return math.ceil(steps / (NUM_ENVS * ROLLOUT_LEN)) * NUM_ENVS * ROLLOUT_LEN


def harl_args(steps: int) -> list[str]:
    """HARL's MPE configuration as measured against pamarl (shared/reference/harl/README.md), every update logged."""
    return [
        "--continuous_actions", "False", "--n_rollout_threads", str(NUM_ENVS), "--episode_length", str(ROLLOUT_LEN),
        "--num_env_steps", str(harl_steps(steps)), "--ppo_epoch", "5", "--critic_epoch", "5",
        "--actor_num_mini_batch", "1", "--critic_num_mini_batch", "1", "--hidden_sizes", "[128,128]",
        "--torch_threads", "1", "--cuda", "False", "--use_eval", "False", "--log_interval", "1",
    ]


_HARL_UPDATE = re.compile(r"updates (\d+)/(\d+) episodes, total num timesteps (\d+)/")
_HARL_RETURN = re.compile(r"average episode reward is (\S+?)\.?$")


@dataclass
class Run:
    """One training run: who, what, where."""

    impl: str  # "pamarl" or "harl"
    name: str  # shown in the table, e.g. "pamarl", "pamarl-after", "harl"
    algo: str
    env: str  # pamarl env id, e.g. mpe/simple_reference_v3
    seed: int
    variant: str = "default"
    extra: list[str] = field(default_factory=list)
    run_dir: Path = Path()
    cmd: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.name} {self.algo}" + ("" if self.variant == "default" else f" [{self.variant}]")


def _task(env: str) -> str:
    if not env.startswith("mpe/") or "?" in env:
        raise SystemExit(f"parity_mpe: HARL runs need a plain mpe2 task id 'mpe/<task>', got {env!r}")
    return env.split("/", 1)[1]


def _slug(env: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", env)


def pamarl_cmd(python: str, run: Run, steps: int) -> list[str]:
    """``pamarl train`` with HARL's MPE sizes; a variant's options go before, its key=value after."""
    options = [t for t in run.extra if t.startswith("-") or "=" not in t]
    keyvals = [t for t in run.extra if not (t.startswith("-") or "=" not in t)]
    return [python, "-m", "pamarl.cli", "train", "--algo", run.algo, "--env", run.env, "--steps", str(steps),
            "--seed", str(run.seed), "--run-dir", str(run.run_dir / "pamarl"), *options, f"num_envs={NUM_ENVS}",
            f"rollout_len={ROLLOUT_LEN}", "eval_every=0", "tensorboard=false", "progress=false", *keyvals]


def harl_cmd(python: str, launcher: str, run: Run, steps: int) -> list[str]:
    return [python, launcher, "--algo", run.algo, "--env", "pettingzoo_mpe", "--exp_name", "parity",
            "--scenario", _task(run.env), *harl_args(steps), "--seed", str(run.seed), "--log_dir",
            str(run.run_dir / "harl"), *run.extra]


Result = tuple[list[float], int]
"""Training team return of every iteration that logged one, and the env steps done."""


def last_pamarl(run_dir: Path) -> Result | None:
    """A finished pamarl run's ``train/return_mean`` column (None: not finished).

    pamarl's own run directory is ``<run>/pamarl`` (pamarl refuses to start a run in a directory holding
    other files, such as this script's ``run.json``); runs measured before that layout sit in ``<run>``."""
    if (run_dir / "pamarl").is_dir():
        run_dir = run_dir / "pamarl"
    if not (run_dir / "summary.json").is_file():
        return None
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [float(r["train/return_mean"]) for r in rows if r.get("train/return_mean")], int(rows[-1]["env_steps"])


def last_harl(run_dir: Path) -> Result | None:
    """HARL's per-update "average episode reward" from its stdout (None: not finished)."""
    log = run_dir / "stdout.log"
    if not log.is_file():
        return None
    done, total, env_steps, rets = 0, -1, 0, []
    for line in log.read_text().splitlines():
        if m := _HARL_UPDATE.search(line):
            done, total, env_steps = int(m.group(1)), int(m.group(2)), int(m.group(3))
        elif m := _HARL_RETURN.search(line):
            rets.append(float(m.group(1)))
    if total < 0 or done != total:
        return None
    if len(rets) != total:
        raise SystemExit(f"parity_mpe: {log} has {len(rets)} returns for {total} updates (run with --log_interval 1)")
    return rets, env_steps


def plan(args: argparse.Namespace) -> list[Run]:
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    envs = [e for e in args.envs.split(",") if e]
    runs: list[Run] = []
    for impl, name, algos, variants in (
        ("harl", "harl", args.harl_algos if args.harl_python else "", {"default": []}),
        ("pamarl", args.name, args.algos, args.variants),
    ):
        for env in envs:
            for algo in [a for a in algos.split(",") if a]:
                for variant, extra in variants.items():
                    group = f"{name}-{algo}" if variant == "default" else f"{name}-{variant}-{algo}"
                    for seed in seeds:
                        r = Run(impl, name, algo, env, seed, variant, extra, out / group / _slug(env) / f"s{seed}")
                        if impl == "pamarl":
                            r.cmd = pamarl_cmd(args.python, r, args.steps)
                        else:
                            r.cmd = harl_cmd(args.harl_python, args.harl_launcher, r, args.steps)
                        runs.append(r)
    # Seed-major order: a batch cut short still has the first seeds of every configuration.
    runs.sort(key=lambda r: seeds.index(r.seed))
    return runs


def found(out: Path) -> list[Run]:
    """Every run recorded under ``out`` (its ``run.json``), whichever invocation made it."""
    runs = []
    for p in sorted(out.glob("*/*/s*/run.json")):
        d = json.loads(p.read_text())
        runs.append(Run(d["impl"], d["name"], d["algo"], d["env"], int(d["seed"]), d["variant"], d["extra"],
                        p.parent, d["cmd"]))
    return runs


def returns_of(run: Run) -> Result | None:
    return last_pamarl(run.run_dir) if run.impl == "pamarl" else last_harl(run.run_dir)


def execute(run: Run, args: argparse.Namespace) -> None:
    if run.run_dir.exists():  # an unfinished run: start it again from nothing
        shutil.rmtree(run.run_dir)
    run.run_dir.mkdir(parents=True)
    info = {k: getattr(run, k) for k in ("impl", "name", "algo", "env", "seed", "variant", "extra", "cmd")}
    (run.run_dir / "run.json").write_text(json.dumps(info, indent=1) + "\n")
    env = dict(os.environ)
    if run.impl == "pamarl" and args.pamarl_src:
        env["PYTHONPATH"] = os.pathsep.join([args.pamarl_src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if run.impl == "harl":
        env["HARL_SRC"] = args.harl_src
    t0 = time.time()
    print(f"[{time.strftime('%H:%M:%S')}] {shlex.join(run.cmd)}", flush=True)
    log = run.run_dir / "stdout.log"
    with open(log, "w") as f:
        rc = subprocess.call(run.cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        raise SystemExit(f"parity_mpe: exit code {rc}; see {log}")
    print(f"    done in {time.time() - t0:.0f} s", flush=True)


def fmt(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.1f}"


def table(runs: list[Run]) -> str:
    """Markdown table of the finished runs, by env, HARL first, then by label."""
    from pamarl.metrics import mean_ci

    groups: dict[tuple[str, str], dict[int, float]] = {}
    steps: dict[tuple[str, str], set[int]] = {}
    for r in runs:
        res = returns_of(r)
        if res is not None and len(res[0]) >= LAST:
            groups.setdefault((r.label, r.env), {})[r.seed] = sum(res[0][-LAST:]) / LAST
            steps.setdefault((r.label, r.env), set()).add(res[1])
    envs = list(dict.fromkeys(r.env for r in runs))
    lines = [f"Mean training team return of the last {LAST} iterations ({NUM_ENVS} envs x {ROLLOUT_LEN}); "
             "mean [95% t-interval] over seeds, then per seed.", "",
             "| env | implementation | env steps | mean [95% CI] | per seed |", "| --- | --- | --- | --- | --- |"]
    for env in envs:
        for label in sorted(dict.fromkeys(r.label for r in runs), key=lambda x: (not x.startswith("harl"), x)):
            vals = groups.get((label, env))
            if not vals:
                continue
            m, lo, hi = mean_ci([vals[s] for s in sorted(vals)])
            per = ", ".join(f"s{s} {vals[s]:.1f}" for s in sorted(vals))
            n = ", ".join(f"{x:,}" for x in sorted(steps[(label, env)]))
            lines.append(f"| {env} | {label} | {n} | {fmt(m)} [{fmt(lo)}, {fmt(hi)}] | {per} |")
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    runs = plan(args)
    todo = [r for r in runs if returns_of(r) is None]
    print(f"{len(runs)} runs, {len(todo)} to train", flush=True)
    for r in todo:
        if args.dry_run:
            print(shlex.join(r.cmd))
        else:
            execute(r, args)
    print()
    return cmd_report(args)


def cmd_report(args: argparse.Namespace) -> int:
    """The table of every finished run under ``--out``, then each run's command."""
    runs = found(Path(args.out))
    print(table(runs))
    print("\nCommands (HARL: HARL_SRC=<mpe2-patched checkout>; pamarl: PYTHONPATH=<its src>):")
    for r in runs:
        print(f"    {shlex.join(r.cmd)}" + ("" if returns_of(r) is not None else "    # not finished"))
    return 0


def cmd_check_identity(args: argparse.Namespace) -> int:
    """HARL's PettingZooMPEEnv (mpe2-patched) against plain ``mpe2.<task>.parallel_env``.

    Both are reset with the same seed (HARL's ``reset`` uses its counter + 1) and stepped with the same
    uniformly random actions from the plain env's action spaces. HARL pads observations with zeros to
    the widest agent (supersuit) and gives every agent the team sum; both must agree exactly.
    """
    import importlib

    import numpy as np

    sys.path.insert(0, args.harl_src)
    from harl.envs.pettingzoo_mpe.pettingzoo_mpe_env import PettingZooMPEEnv

    rng = np.random.default_rng(0)
    ok = True
    for task in args.tasks.split(","):
        harl = PettingZooMPEEnv({"scenario": task, "continuous_actions": False})
        plain = importlib.import_module(f"mpe2.{task}").parallel_env(max_cycles=25)
        checked = 0
        bad: list[str] = []
        for ep in range(args.episodes):
            seed = 1000 + ep
            harl.seed(seed - 1)
            h_obs, h_state, _ = harl.reset()
            p_obs, _ = plain.reset(seed=seed)
            agents = list(plain.possible_agents)
            for t in range(26):
                for i, a in enumerate(agents):
                    o = np.asarray(p_obs[a], np.float32)
                    h = np.asarray(h_obs[i], np.float32)
                    if not (np.array_equal(h[: o.size], o) and not h[o.size:].any()):
                        bad.append(f"obs {a} ep {ep} t {t}")
                if not np.array_equal(np.asarray(h_state[0]), np.asarray(plain.state())):
                    bad.append(f"state ep {ep} t {t}")
                acts = {a: int(rng.integers(plain.action_space(a).n)) for a in agents}
                h_obs, h_state, h_rew, h_done, _, _ = harl.step(np.array([[acts[a]] for a in agents]))
                p_obs, p_rew, p_term, p_trunc, _ = plain.step(acts)
                team = sum(p_rew[a] for a in agents)
                if any(r[0] != team for r in h_rew):
                    bad.append(f"reward ep {ep} t {t}: {h_rew[0][0]} vs {team}")
                p_done = [p_term[a] or p_trunc[a] for a in agents]
                if list(h_done) != p_done:
                    bad.append(f"done ep {ep} t {t}: {list(h_done)} vs {p_done}")
                checked += 1
                if all(p_done):
                    break
        print(f"{task}: {checked} steps over {args.episodes} episodes; "
              + ("observations, state, team reward and episode ends identical" if not bad
                 else f"{len(bad)} differences, first: {bad[:3]}"))
        ok &= not bad
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("run", help="train what is missing under --out, then print the table")
    s.add_argument("--out", default="parity_runs", help="results folder (finished runs are reused)")
    s.add_argument("--algos", default="happo,mappo", help="pamarl algorithms, comma-separated")
    s.add_argument("--envs", default="mpe/simple_speaker_listener_v4,mpe/simple_reference_v3")
    s.add_argument("--seeds", default="1,2,3")
    s.add_argument("--steps", type=int, default=STEPS, help="env steps per run (HARL: rounded up to whole updates)")
    s.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                   help="pamarl variant: a name and extra train arguments, e.g. 'harl=--preset harl' or "
                        "'shared=critic=shared'; repeatable (default: one variant, 'default=')")
    s.add_argument("--name", default="pamarl", help="this pamarl version's name in the table and folders, "
                                                    "e.g. pamarl-before, pamarl-after")
    s.add_argument("--python", default=sys.executable, help="python that runs pamarl")
    s.add_argument("--pamarl-src", help="put this pamarl source folder first on PYTHONPATH")
    s.add_argument("--harl-python", help="python of HARL's venv; with it HARL is run too")
    s.add_argument("--harl-src", help="mpe2-patched HARL checkout")
    s.add_argument("--harl-launcher", help="harl_train.py (default: shared/reference/harl/harl_train.py)")
    s.add_argument("--harl-algos", default="happo", help="HARL algorithms, comma-separated")
    s.add_argument("--dry-run", action="store_true", help="print the commands of the runs left to do")
    r = sub.add_parser("report", help="the table of every finished run under --out")
    r.add_argument("--out", default="parity_runs")
    c = sub.add_parser("check-identity")
    c.add_argument("--harl-src", required=True)
    c.add_argument("--tasks", default="simple_speaker_listener_v4,simple_reference_v3,simple_spread_v3")
    c.add_argument("--episodes", type=int, default=20)
    args = p.parse_args(argv)
    if args.command == "check-identity":
        return cmd_check_identity(args)
    if args.command == "report":
        return cmd_report(args)
    args.variants = {}
    for v in args.variant or ["default="]:
        name, sep, extra = v.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise SystemExit(f"parity_mpe: --variant must be NAME=ARGS with a plain NAME, got {v!r}")
        args.variants[name] = shlex.split(extra)
    if args.harl_python:
        if not args.harl_src:
            raise SystemExit("parity_mpe: --harl-python needs --harl-src (the mpe2-patched HARL checkout)")
        if not args.harl_launcher:
            root = Path(__file__).resolve().parents[1]
            for base in (root, *root.parents):
                cand = base / "shared" / "reference" / "harl" / "harl_train.py"
                if cand.is_file():
                    args.harl_launcher = str(cand)
                    break
            else:
                raise SystemExit("parity_mpe: harl_train.py not found; give --harl-launcher")
    return cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
