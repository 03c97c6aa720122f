"""Stopping a run cleanly: Ctrl-C and SIGTERM ask for a checkpoint at the end of the current iteration.

:class:`StopRequest` replaces the SIGINT/SIGTERM handlers while a run trains: the first signal only
sets ``requested`` (the training loop then writes ``checkpoints/latest.pt`` after the iteration in
progress and raises :class:`~pamarl.errors.RunInterrupted` saying where); a second one stops at once
(``KeyboardInterrupt``), and the message then names the newest checkpoint already on disk, if any.
:class:`CheckpointClock` says when ``checkpoint_minutes`` of wall time passed since the last checkpoint.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

SIGNAL_NAMES: dict[int, str] = {int(signal.SIGINT): "Ctrl-C (SIGINT)", int(signal.SIGTERM): "SIGTERM"}


class StopRequest:
    """``with StopRequest() as stop: ... if stop.requested: ...`` (handlers restored on exit)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return SIGNAL_NAMES.get(self.signum or signal.SIGINT, f"signal {self.signum}")

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # asked twice: stop now
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\npamarl: {SIGNAL_NAMES.get(signum, signum)} received: writing a checkpoint at the end of this "
              "iteration, then stopping (press Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


class CheckpointClock:
    """True from :meth:`due` once ``minutes`` passed since the last :meth:`reset` (never with 0)."""

    def __init__(self, minutes: float):
        self.seconds = float(minutes) * 60.0
        self.last = time.monotonic()

    def due(self) -> bool:
        return self.seconds > 0 and time.monotonic() - self.last >= self.seconds

    def reset(self) -> None:
        self.last = time.monotonic()


def latest_checkpoint_note(ckpt_dir: Path) -> str:
    """A true sentence about what a resume would start from."""
    latest = ckpt_dir / "latest.pt"
    if not latest.is_file():
        return "no checkpoint was written yet, so a resume is not possible: start the run again"
    try:
        from pamarl.checkpoint import load_checkpoint

        state = load_checkpoint(latest)
        where = f"iteration {int(state['iteration'])}, {int(state['env_steps']):,} env steps"
    except Exception:  # noqa: BLE001 - only the message depends on it
        where = "its iteration could not be read"
    return f"the newest checkpoint is {latest} ({where}); resume with `pamarl train --resume {ckpt_dir.parent}`"
