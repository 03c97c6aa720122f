"""Reliability of run directories under abuse (issue 12), measured with real ``pamarl train`` processes.

    python benchmarks/reliability.py --kills 12 --signals 3 --concurrent 5 --out /tmp/rel [--tmpfs DIR]

* kill -9 at random moments, each time resuming from the latest checkpoint (starting over with
  ``--overwrite`` when no checkpoint existed yet), until the run finishes; then compare metrics.csv
  (all columns but wall time) and every tensor of ``final.pt`` with an uninterrupted run of the same
  seed. Periodic checkpoints only (``checkpoint_minutes=0``): those resume bit-exactly.
* SIGINT and SIGTERM at random moments: exit code, seconds from signal to exit, iterations lost
  (logged minus checkpointed), and that the resumed run finishes.
* disk full: the run directory on ``--tmpfs`` (a small tmpfs the caller mounted, e.g.
  ``mount -t tmpfs -o size=3m tmpfs DIR``) filled up but for a few KiB; then the message, the exit
  code, whether ``latest.pt`` is still loadable, and whether the run resumes once space is freed.
* concurrent starts: several processes started at once on one run directory; how many trained.

Task: MAPPO on the penalty matrix game with tiny networks, so that kills land mid-training cheaply.
Prints one JSON object per experiment.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

CLI = [sys.executable, "-m", "pamarl.cli", "train"]
TASK = ["--algo", "mappo", "--env", "matrix/penalty", "num_envs=2", "rollout_len=10", "hidden=[16]",
        "eval_episodes=2", "eval_every=50", "tensorboard=false", "progress=false"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")
TOTAL = 100
"""Iterations of the kill -9 run: 2000 steps of 2 envs x 10."""


def rows(d: Path) -> list[list[str]]:
    lines = (d / "metrics.csv").read_text().splitlines()
    return [ln.split(",", 3)[:2] + ln.split(",", 3)[3:] for ln in lines]  # drop wall_s (column 3)


def tensors(d: Path) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []

    def walk(x: object) -> None:
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                walk(x[k])
        elif isinstance(x, list | tuple):
            for v in x:
                walk(v)

    walk(torch.load(d / "checkpoints" / "final.pt", weights_only=True)["algo"])
    return out


def ckpt_iteration(d: Path) -> int:
    p = d / "checkpoints" / "latest.pt"
    return int(torch.load(p, weights_only=True)["iteration"]) if p.exists() else 0


def logged(d: Path) -> int:
    p = d / "metrics.csv"
    return max(0, len(p.read_text().splitlines()) - 1) if p.exists() else 0


def kill9(out: Path, n: int, rng: random.Random, minutes: float = 0.0) -> dict:
    """With ``minutes`` > 0: wall-time checkpoints only (no periodic ones), which do not resume bit-exactly."""
    every = ["checkpoint_every=0", f"checkpoint_minutes={minutes}"] if minutes else ["checkpoint_every=5",
                                                                                     "checkpoint_minutes=0"]
    cfg = [*TASK, "--steps", "2000", *every]
    ref, vic = out / "ref", out / "victim"
    t0 = time.perf_counter()
    subprocess.run([*CLI, *cfg, "--run-dir", str(ref)], check=True, env=ENV, capture_output=True)
    ref_s = time.perf_counter() - t0
    kills, restarts, lost, starts = 0, 0, [], 0
    while True:
        if (vic / "checkpoints" / "latest.pt").exists():
            cmd = [*CLI, "--resume", str(vic)]
        else:
            cmd = [*CLI, *cfg, "--run-dir", str(vic)] + (["--overwrite"] if vic.exists() and logged(vic) else [])
            restarts += starts > 0
        starts += 1
        t_start = time.time()
        p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if kills < n:
            if rng.random() < 0.2:  # sometimes while it starts up (imports, env construction)
                time.sleep(rng.uniform(0.2, 3.0))
            else:  # else at a random iteration past the checkpoint, at a random moment inside it
                target = rng.randint(ckpt_iteration(vic) + 1, TOTAL - 1)
                metrics = vic / "metrics.csv"
                while p.poll() is None and not (metrics.exists() and metrics.stat().st_mtime > t_start
                                                and logged(vic) >= target):
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 0.05))
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
                kills += 1
                lost.append(logged(vic) - ckpt_iteration(vic))
                continue
        p.wait()
        err = p.stderr.read().decode() if p.stderr else ""
        if p.returncode != 0:
            raise SystemExit(f"run failed after {kills} kills: {err}")
        break
    same_rows = rows(vic) == rows(ref)
    a, b = tensors(vic), tensors(ref)
    same_params = len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    return {"experiment": "kill -9", "checkpoints": " ".join(every), "kills": kills,
            "fresh_starts_after_kill_before_first_checkpoint": restarts,
            "iterations_lost_per_kill": lost, "metrics_identical": same_rows, "final_params_identical": same_params,
            "tensors_compared": len(a), "uninterrupted_run_s": round(ref_s, 1)}


def signals(out: Path, n: int, rng: random.Random) -> dict:
    res = []
    for i in range(2 * n):
        sig = signal.SIGINT if i % 2 == 0 else signal.SIGTERM
        d = out / f"sig{i}"
        p = subprocess.Popen([*CLI, *TASK, "--steps", "2000", "--run-dir", str(d), "checkpoint_every=0"], env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while logged(d) < 2 and p.poll() is None:  # signal a run that is training, not one still importing
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 2.0))
        t = time.perf_counter()
        p.send_signal(sig)
        p.wait()
        stop_s = time.perf_counter() - t
        err = p.stderr.read().decode() if p.stderr else ""
        said = "checkpoint written to" in err and "Traceback" not in err
        lost = logged(d) - ckpt_iteration(d)
        r = subprocess.run([*CLI, "--resume", str(d)], env=ENV, capture_output=True)
        res.append({"signal": signal.Signals(sig).name, "exit": p.returncode, "stop_s": round(stop_s, 2),
                    "message_names_checkpoint": said, "iterations_lost": lost, "resume_exit": r.returncode})
    return {"experiment": "SIGINT/SIGTERM", "runs": res}


def disk_full(out: Path, tmpfs: Path, free_kib: list[int]) -> dict:
    res = []
    for kib in free_kib:
        for p in tmpfs.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        d = tmpfs / "run"
        filler = tmpfs / "filler"
        avail = shutil.disk_usage(tmpfs).free
        with open(filler, "wb") as f:
            f.write(b"\0" * max(0, avail - kib * 1024))
        r = subprocess.run([*CLI, *TASK, "--steps", "2000", "--run-dir", str(d), "checkpoint_every=1"], env=ENV,
                           capture_output=True)
        err = r.stderr.decode()
        ck = d / "checkpoints" / "latest.pt"
        try:
            loadable = ck.exists() and torch.load(ck, weights_only=True)["format"] == "pamarl-checkpoint-1"
        except Exception:  # noqa: BLE001 - a corrupt checkpoint is what this measures
            loadable = False
        tmp_left = any(p.name.endswith(".tmp") for p in (d / "checkpoints").glob("*")) if ck.parent.exists() else False
        filler.unlink()
        again = subprocess.run([*CLI, "--resume", str(d)], env=ENV, capture_output=True) if ck.exists() else None
        res.append({"free_kib": kib, "exit": r.returncode, "traceback": "Traceback" in err,
                    "message": err.strip().splitlines()[-1][:200] if err.strip() else "",
                    "latest_loadable": loadable, "tmp_file_left": tmp_left,
                    "resume_exit_after_freeing": None if again is None else again.returncode})
    return {"experiment": "disk full", "runs": res}


def concurrent(out: Path, rounds: int, k: int = 4) -> dict:
    res = []
    for i in range(rounds):
        d = out / f"conc{i}"
        procs = [subprocess.Popen([*CLI, *TASK, "--steps", "400", "--run-dir", str(d)], env=ENV,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(k)]
        codes = [p.wait() for p in procs]
        errs = [p.stderr.read().decode() if p.stderr else "" for p in procs]
        summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
        res.append({"exit_codes": sorted(codes), "trained": codes.count(0),
                    "refused_in_use": sum("in use by" in e for e in errs),
                    "refused_already_holds": sum("already holds" in e for e in errs),
                    "rows_logged": logged(d), "summary_env_steps": summary.get("env_steps")})
    return {"experiment": "concurrent starts", "processes_per_round": k, "rounds": res}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/pamarl-reliability")
    ap.add_argument("--kills", type=int, default=12)
    ap.add_argument("--signals", type=int, default=3, help="runs per signal")
    ap.add_argument("--concurrent", type=int, default=5, help="rounds")
    ap.add_argument("--tmpfs", help="a small, empty, writable file system for the disk-full test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--env", default="matrix/penalty", help="task (matrix/penalty: one-step episodes; "
                    "mpe/simple_spread_v3: 25-step episodes that span iterations)")
    ap.add_argument("--minutes", type=float, default=0.0,
                    help="kill -9 with wall-time checkpoints every MINUTES instead of periodic ones")
    ap.add_argument("--only", choices=("kill", "signals", "concurrent", "disk"), help="run one experiment")
    args = ap.parse_args()
    TASK[TASK.index("--env") + 1] = args.env
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = random.Random(args.seed)
    exps = {"kill": lambda: kill9(out, args.kills, rng, args.minutes),
            "signals": lambda: signals(out, args.signals, rng), "concurrent": lambda: concurrent(out, args.concurrent)}
    if args.tmpfs:
        exps["disk"] = lambda: disk_full(out, Path(args.tmpfs), [40, 120, 200])
    for name, exp in exps.items():
        if args.only not in (None, name):
            continue
        t = time.perf_counter()
        r = exp()
        r["seconds"] = round(time.perf_counter() - t, 1)
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
