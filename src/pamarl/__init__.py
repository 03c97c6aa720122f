"""pamarl: cooperative multi-agent reinforcement learning.

The library's own algorithm is the progressive asynchronous update (``pamarl.algos.progressive``);
around it stand MAPPO, IPPO, the heterogeneous-agent family and the off-policy family. Importing
``pamarl`` is cheap: submodules (and torch) load when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "make_env": ("pamarl.envs.registry", "make_env"),
    "train": ("pamarl.runner", "train"),
    "TrainConfig": ("pamarl.config", "TrainConfig"),
    "algorithms": ("pamarl.algos.registry", "algorithms"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'pamarl' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
