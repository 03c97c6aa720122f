"""Shared test settings: one torch thread (the library default), quiet runs in temporary dirs."""

from __future__ import annotations

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
