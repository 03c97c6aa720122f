"""How ``pamarl compare`` runs its jobs: one interface, a local-subprocess backend and a Ray backend.

* :class:`LocalLauncher` (the default): each run is a ``pamarl train`` subprocess on this machine.
* :func:`run_jobs`: the loop that keeps ``--workers`` runs going on a launcher, with a progress bar.
* :class:`RayLauncher` (``--backend ray [--address auto|HOST:PORT]``): each run is a Ray task with
  ``--cpus-per-run`` CPUs (default 1) and one torch thread, scheduled anywhere on the cluster. The task
  decides from the run directory whether to start or to resume (the run directory is the source of
  truth), so when its worker process or node dies Ray retries it (``--max-retries`` times) and it
  resumes from its last checkpoint. Every start is appended to ``RUN_DIR/attempts.jsonl`` (launch id,
  node, state, env steps it started from); the report lists the runs that needed a retry.

Storage: on a cluster every node must reach ``--out`` at the same path (NFS or another shared file
system), since the tasks write their run directories there and the driver reads them for progress
and the report.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from pamarl.compare import Job

ATTEMPTS = "attempts.jsonl"


def train_args(run_dir: Path, steps: int, state: str | None = None, env: str | None = None) -> tuple[str, list[str]]:
    """``(state, pamarl train arguments)``: ``state`` (new | resume) as the planner decided, or, without it,
    resume from the run's checkpoint if it has one, else start it. ``env`` (the planned env id) is
    re-stated on a resume, so an env id that imports code is never taken from the run directory alone."""
    if state is None:
        state = "resume" if (run_dir / "checkpoints" / "latest.pt").exists() else "new"
    if state == "resume":
        restate = ["--env", env] if env else []
        return "resume", ["train", "--resume", str(run_dir), *restate, "--steps", str(steps), "progress=false"]
    return "new", ["train", "--config", str(run_dir / "launch.yaml")]


def prepare(run_dir: Path, config: dict[str, Any], state: str) -> None:
    """A new run starts from an empty directory holding its ``launch.yaml``."""
    if state == "new" and run_dir.exists():
        shutil.rmtree(run_dir)  # a run that died before its first checkpoint: nothing to keep
    run_dir.mkdir(parents=True, exist_ok=True)
    if state == "new":
        (run_dir / "launch.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def _record(run_dir: Path, launch: str, state: str) -> None:
    done = 0
    if state == "resume":
        with contextlib.suppress(Exception):
            from pamarl.checkpoint import load_checkpoint

            done = int(load_checkpoint(run_dir / "checkpoints" / "latest.pt")["env_steps"])
    line = {"launch": launch, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "node": socket.gethostname(),
            "pid": os.getpid(), "state": state, "from_env_steps": done}
    if launch.startswith("ray-"):
        import ray

        line["ray_node_id"] = ray.get_runtime_context().get_node_id()
    with open(run_dir / ATTEMPTS, "a") as f:
        f.write(json.dumps(line) + "\n")


def _attempts(run_dir: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(x) for x in (run_dir / ATTEMPTS).read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return []


def retries_of(run_dir: Path) -> list[dict[str, Any]]:
    """The starts of ``run_dir`` that were retries (a launch id seen before), for the report."""
    seen: set[str] = set()
    out = []
    for a in _attempts(run_dir):
        if a.get("launch") in seen:
            out.append(a)
        seen.add(a.get("launch", ""))
    return out


class Launcher(ABC):
    """Starts runs and reports when they end."""

    @abstractmethod
    def start(self, run_dir: Path, config: dict[str, Any], steps: int, state: str) -> Any:
        """Start (``state`` new) or resume the run in ``run_dir``; returns a handle."""

    @abstractmethod
    def poll(self, handle: Any) -> int | None:
        """None while running, else the exit status (0: finished)."""

    @abstractmethod
    def interrupt(self, handles: list[Any]) -> None:
        """Stop the running runs between iterations (their checkpoints stay intact)."""

    def close(self) -> None:  # noqa: B027 - optional
        """Release the backend."""


class LocalLauncher(Launcher):
    """A ``pamarl train`` subprocess per run, one torch thread each; output to ``RUN_DIR/train.log``."""

    def start(self, run_dir: Path, config: dict[str, Any], steps: int, state: str) -> subprocess.Popen[bytes]:
        state, args = train_args(run_dir, steps, state, config["run"]["env"])
        prepare(run_dir, config, state)
        _record(run_dir, uuid.uuid4().hex, state)
        cmd = [sys.executable, "-m", "pamarl.cli", *args]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        with open(run_dir / "train.log", "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {state}: {shlex.join(cmd)}\n".encode())
            log.flush()
            # Own session: Ctrl-C reaches this process only, which then stops the runs in order.
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def poll(self, handle: Any) -> int | None:
        return handle.poll()

    def interrupt(self, handles: list[Any]) -> None:
        for proc in handles:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # the runner stops between iterations; checkpoints stay intact
        deadline = time.time() + 20
        for proc in handles:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()


def run_in_worker(run_dir: str, config: dict[str, Any], steps: int, launch: str, state: str) -> int:
    """Body of a Ray task: start or resume the run, output to train.log.

    A retry (this launch id already started once) resumes from whatever checkpoint the directory holds.
    Training runs in the task's own process, so that when the process dies nothing of the run keeps
    running beside the retry.
    """
    from pamarl.cli import main

    d = Path(run_dir)
    retry = any(a.get("launch") == launch for a in _attempts(d))
    state, args = train_args(d, steps, None if retry else state, config["run"]["env"])
    prepare(d, config, state)
    _record(d, launch, state)
    with open(d / "train.log", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        print(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {state} on {socket.gethostname()} (Ray task): "
              f"pamarl {shlex.join(args)}", flush=True)
        rc = main(args)
        print(f"=== exit {rc}", flush=True)
    return int(rc)


class RayLauncher(Launcher):
    """A Ray task per run (``cpus`` CPUs, one torch thread), retried ``max_retries`` times if its worker dies."""

    def __init__(self, address: str | None = None, cpus: float = 1.0, max_retries: int = 3):
        from pamarl.distributed.pool import init_ray

        self.ray = init_ray(address)
        threads = str(max(1, int(cpus)))
        self.task = self.ray.remote(run_in_worker).options(
            num_cpus=cpus, max_retries=max_retries, retry_exceptions=False,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                                      "PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
        self.failures: dict[Any, str] = {}

    def start(self, run_dir: Path, config: dict[str, Any], steps: int, state: str) -> Any:
        return self.task.remote(str(run_dir.resolve()), config, steps, f"ray-{uuid.uuid4().hex}", state)

    def poll(self, handle: Any) -> int | None:
        done, _ = self.ray.wait([handle], timeout=0)
        if not done:
            return None
        try:
            return int(self.ray.get(handle))
        except Exception as e:  # noqa: BLE001 - the task failed for good (retries used up, or an error)
            self.failures[handle] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e) else ''}"
            return 1

    def interrupt(self, handles: list[Any]) -> None:
        for h in handles:
            with contextlib.suppress(Exception):
                self.ray.cancel(h)  # KeyboardInterrupt in the task: the runner stops between iterations
        with contextlib.suppress(Exception):
            self.ray.wait(handles, num_returns=len(handles), timeout=20)


def make_launcher(backend: str, address: str | None = None, cpus: float = 1.0, max_retries: int = 3) -> Launcher:
    if backend == "ray":
        return RayLauncher(address, cpus, max_retries)
    return LocalLauncher()


# ----------------------------------------------------------------------------- the scheduling loop
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


def run_jobs(jobs: list[Job], workers: int, quiet: bool = False,
             launcher: Launcher | None = None) -> tuple[list[Job], list[tuple[Job, str]]]:
    """Run the jobs that are not done, ``workers`` at a time, on ``launcher`` (default: local subprocesses);
    returns (finished, failed with a log tail)."""
    from tqdm import tqdm

    launcher = launcher or LocalLauncher()
    todo = [j for j in jobs if j.state != "done"]
    total = sum(j.steps for j in jobs)
    done_steps = {id(j): (j.steps if j.state == "done" else j.done_steps) for j in jobs}
    bar = tqdm(total=total, initial=sum(done_steps.values()), unit="step", unit_scale=True, disable=quiet,
               dynamic_ncols=True, mininterval=1.0, desc=f"compare ({len(todo)} runs to go)")
    running: dict[int, tuple[Job, Any, float]] = {}
    finished: list[Job] = []
    failed: list[tuple[Job, str]] = []
    queue = list(todo)
    try:
        while queue or running:
            while queue and len(running) < workers:
                job = queue.pop(0)
                handle = launcher.start(job.run_dir, job.config, job.steps, job.state)
                running[id(job)] = (job, handle, time.perf_counter())
                bar.write(f"start  {job.algo:<12} {job.env}  seed {job.seed}"
                          + (f"  (resuming at {job.done_steps:,} steps)" if job.state == "resume" else ""))
            time.sleep(0.5)
            for key, (job, proc, t0) in list(running.items()):
                done_steps[key] = max(done_steps[key], _progress_of(job))
                rc = launcher.poll(proc)
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
                    why = getattr(launcher, "failures", {}).get(proc)
                    tail = f"    {why}\n{tail}" if why else tail
                    failed.append((job, tail))
                    bar.write(f"FAILED {job.algo:<12} {job.env}  seed {job.seed} (exit {rc}); "
                              f"see {job.run_dir / 'train.log'}:\n{tail}")
            bar.set_description(f"compare ({len(queue) + len(running)} runs to go)", refresh=False)
            now = sum(done_steps.values())
            if now > bar.n:
                bar.update(now - bar.n)  # redraws at most once per mininterval
    except KeyboardInterrupt:
        launcher.interrupt([h for _, h, _ in running.values()])
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
