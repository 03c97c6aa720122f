"""Shared test settings: one torch thread (the library default), quiet runs in temporary dirs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch

torch.set_num_threads(1)


def quick_run(tmp_path, name: str = "run", **kw):
    """A TrainConfig for tests: no progress bar, no TensorBoard, no periodic evaluation."""
    from pamarl.config import TrainConfig

    base = dict(progress=False, tensorboard=False, eval_every=0, run_dir=str(tmp_path / name))
    base.update(kw)
    return TrainConfig(**base)


# Every torch device present: CPU always, CUDA where a GPU is usable (tests parametrised over devices).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@contextlib.contextmanager
def update_crashes_at(monkeypatch: pytest.MonkeyPatch, cls: Any, n: int) -> Iterator[None]:
    """Within the block, ``cls.update`` raises KeyboardInterrupt on its ``n``-th call (a run killed mid-way,
    after whichever checkpoints came before); the real update is back afterwards, for the resume."""
    real_update, calls = cls.update, {"n": 0}

    def crashing_update(self: Any, progress: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real_update(self, progress)

    monkeypatch.setattr(cls, "update", crashing_update)
    try:
        yield
    finally:
        monkeypatch.setattr(cls, "update", real_update)
