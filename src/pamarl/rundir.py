"""Run directories: one writer at a time, never overwritten by accident, a history of resumed changes.

* :class:`RunLock` holds ``RUN/.pamarl.lock`` with ``fcntl.flock`` for as long as a process trains
  there. The kernel drops the lock when the process dies (even on ``kill -9``), so a crashed run
  never leaves it stuck; the file's text (pid, host, start time) only names the holder in the message.
* :func:`prepare_new` refuses to start a new run in a directory that already holds something, unless
  ``overwrite`` (``--overwrite``), which deletes pamarl's own outputs there and nothing else.
* :func:`record_changes` appends what a resume changed to ``RUN/config_history.yaml``, and
  :func:`apply_optimizer_changes` carries changed learning rates into the optimisers just loaded from
  a checkpoint (their saved ``lr`` would otherwise win).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from pamarl.errors import UsageError

LOCK_NAME = ".pamarl.lock"
LAUNCH_FILES = ("launch.yaml", "train.log", "attempts.jsonl")
"""What ``pamarl compare``'s launchers write into a run directory before they start the run there."""
OUTPUTS = ("config.yaml", "metrics.csv", "eval_episodes.jsonl", "summary.json", "checkpoints", "tb",
           "config_history.yaml")
"""What a training run writes (``--overwrite`` deletes these, and only these)."""
HISTORY = "config_history.yaml"

try:
    import fcntl
except ImportError:  # Windows: no flock; the pid file alone names a likely concurrent writer
    fcntl = None  # type: ignore[assignment]


def _fs_error(what: str, path: Path, e: OSError) -> UsageError:
    return UsageError(f"{what} {str(path)!r}: {e.strerror or e}. Choose another --run-dir or fix its permissions")


class RunLock:
    """An exclusive, crash-safe lock on a run directory (``with RunLock(d): ...``)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
            return f"process {info.get('pid')} on {info.get('host')} (since {info.get('started')})"
        except (OSError, ValueError):
            return "another process"

    def acquire(self) -> RunLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _fs_error("cannot write in run directory", self.path.parent, e) from e
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UsageError(
                    f"run directory {str(self.path.parent)!r} is in use by {self.holder()}: two processes never "
                    "write one run. Wait for it to finish (or stop it), or choose another --run-dir"
                ) from None
            except OSError as e:  # a file system without locks (some network mounts): say so, go on
                print(f"pamarl: warning: cannot lock {self.path} ({e.strerror}); make sure no other process "
                      "writes this run directory", file=sys.stderr)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode())
        except OSError:
            pass  # the text only improves the message of a second process
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (deleting it would race a waiter)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def is_locked(run_dir: str | Path) -> str | None:
    """Who holds ``run_dir``'s lock right now (None: nobody)."""
    lock = RunLock(run_dir)
    if fcntl is None or not lock.path.exists():
        return None
    try:
        fd = os.open(lock.path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return lock.holder()
    except OSError:
        return None
    finally:
        os.close(fd)


def make_dir(run_dir: Path) -> bool:
    """Create ``run_dir`` or say clearly why not (a file there, permissions, name too long); True if it was made."""
    try:
        if run_dir.exists() and not run_dir.is_dir():
            raise UsageError(f"run directory {str(run_dir)!r} is a file, not a directory; choose another --run-dir")
        fresh = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _fs_error("cannot create run directory", run_dir, e) from e
    return fresh


def prepare_new(run_dir: Path, overwrite: bool = False) -> None:
    """Check (with the lock held) that a new run may write ``run_dir``; with ``overwrite`` clear pamarl's outputs."""
    present = sorted(p.name for p in run_dir.iterdir() if p.name not in (LOCK_NAME, *LAUNCH_FILES))
    if not present:
        return
    if not overwrite:
        shown = ", ".join(present[:5]) + (" ..." if len(present) > 5 else "")
        raise UsageError(
            f"run directory {str(run_dir)!r} already holds a run or other files ({shown}); nothing was changed. "
            f"Continue it with `pamarl train --resume {run_dir}`, start over deliberately with --overwrite "
            "(deletes its checkpoints and logs), or choose another --run-dir"
        )
    ours = [n for n in present if n in OUTPUTS]
    if not ours:
        raise UsageError(
            f"run directory {str(run_dir)!r} holds files pamarl did not write ({', '.join(present[:5])}); "
            "--overwrite only deletes a run's own outputs. Choose another --run-dir"
        )
    for name in ours:
        p = run_dir / name
        try:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        except OSError as e:
            raise _fs_error("cannot delete the old run's", p, e) from e


def check_resume(run: Any, algo_cfg: Any, state: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """What this resume changes against the run's saved config; refuses what would void the checkpoint."""
    from pamarl.config import TrainConfig, to_dict
    from pamarl.errors import CheckpointError
    from pamarl.validation import resume_changes

    doc = yaml.safe_load((Path(str(run.run_dir)) / "config.yaml").read_text()) or {}

    changes = resume_changes(doc.get("run", {}), to_dict(run), TrainConfig)
    changes.update(resume_changes(doc.get("algo", {}), to_dict(algo_cfg), type(algo_cfg)))
    for key, now in (("algo_name", run.algo), ("env", run.env)):
        if state.get(key) not in (None, now):
            raise CheckpointError(f"the checkpoint was written by a run of {state[key]!r}, not {now!r}; "
                                  "give a checkpoint of this run with --checkpoint")
    done = int(state["env_steps"])
    if run.steps <= done:
        raise UsageError(f"the run already did {done:,} env steps (its budget was {run.steps:,}); give a larger "
                         "--steps to train it further")
    return changes


def record_changes(run_dir: Path, changes: dict[str, tuple[Any, Any]], iteration: int, env_steps: int,
                   checkpoint: str) -> None:
    """Append one resume's changed keys to ``RUN/config_history.yaml`` (a YAML list, oldest first)."""
    path = run_dir / HISTORY
    entry = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "resumed_from": checkpoint,
        "iteration": iteration,
        "env_steps": env_steps,
        "changes": {k: {"from": a, "to": b} for k, (a, b) in changes.items()},
    }
    with open(path, "a") as f:
        f.write(yaml.safe_dump([entry], sort_keys=False))


def _optimizers(algo: Any) -> list[tuple[str, Any]]:
    """``(config key of its learning rate, optimiser)`` for every optimiser of ``algo``."""
    import torch

    found: dict[int, tuple[str, Any]] = {}
    for attr, key in (("actor_opts", "lr"), ("critic_opts", "critic_lr")):
        for o in getattr(algo, attr, None) or []:
            found.setdefault(id(o), (key, o))
    for name, o in (getattr(algo, "opts", None) or {}).items():
        if isinstance(o, torch.optim.Optimizer):
            found.setdefault(id(o), ("critic_lr" if "critic" in name else "lr", o))
    return list(found.values())


def restore(algo: Any, state: dict[str, Any], changes: dict[str, tuple[Any, Any]], quiet: bool = False) -> None:
    """Load a checkpoint's algorithm state, then apply what the resume changed (learning rates)."""
    from pamarl.errors import CheckpointError

    try:
        algo.load_state_dict(state["algo"])
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as e:
        raise CheckpointError(f"the checkpoint does not match this run's algorithm, network sizes or env "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    apply_optimizer_changes(algo, changes)
    if not state.get("exact", True) and not quiet:
        print("pamarl: resuming from a checkpoint written between periodic ones (wall time or a signal): "
              "the run continues correctly, but not bit-identically to an uninterrupted one", flush=True)


def apply_optimizer_changes(algo: Any, changes: dict[str, tuple[Any, Any]]) -> None:
    """Carry changed ``lr``/``critic_lr``/``adam_eps`` into optimiser state loaded from a checkpoint.

    A learning rate is scaled by new/old, so a schedule's progress (``lr_anneal``) is kept. Nothing is
    touched when nothing changed, so a plain resume stays bit-exact.
    """
    for key, opt in _optimizers(algo):
        for group in opt.param_groups:
            if key in changes:
                old, new = (float(v) for v in changes[key])
                group["lr"] = group["lr"] * new / old if old > 0 else new
            if "adam_eps" in changes and "eps" in group:
                group["eps"] = float(changes["adam_eps"][1])
