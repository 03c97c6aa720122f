"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)`` (no code runs on load)."""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

from pamarl.errors import CheckpointError

FORMAT = "pamarl-checkpoint-1"


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` via a temporary file and an atomic rename.

    A crash mid-write leaves the previous checkpoint at ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        # torch's zip writer reports a full disk as a RuntimeError ("unexpected pos ..."): say what happened.
        tmp.unlink(missing_ok=True)
        try:
            free = shutil.disk_usage(path.parent).free
        except OSError:
            free = -1
        full = getattr(e, "errno", None) == errno.ENOSPC or 0 <= free < 64 << 20
        cause = f"the disk is full ({max(free, 0) // 2**20} MiB free)" if full else f"{type(e).__name__}: {e}"
        previous = "the previous checkpoint there is intact" if path.exists() else "no earlier checkpoint exists"
        fix = (". Free some space, then resume" if path.exists() else ". Free some space, then start the run again "
               "(--overwrite)") if full else ""
        raise CheckpointError(f"could not write checkpoint {str(path)!r}: {cause}; {previous}{fix}") from e


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint safely; a missing, truncated or foreign file raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or not a pamarl checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Other checkpoints in the run directory are untouched; "
            "resume from another one with --checkpoint."
        ) from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a {FORMAT} file")
    return data
