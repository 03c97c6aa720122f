"""Algorithm registry: ``@register`` on the class; names resolve lazily to their modules."""

from __future__ import annotations

import difflib
import importlib

from pamarl.algos.base import Algorithm
from pamarl.errors import UsageError

_ALGOS: dict[str, type[Algorithm]] = {}
# Built-in algorithms and the module defining each; imported on first use.
BUILTIN = {
    "mappo": "pamarl.algos.mappo",
    "ippo": "pamarl.algos.ippo",
    "happo": "pamarl.algos.happo",
    "hatrpo": "pamarl.algos.hatrpo",
    "haa2c": "pamarl.algos.haa2c",
    "progressive": "pamarl.algos.progressive",
    "fixed_ratio": "pamarl.algos.progressive",
    "maddpg": "pamarl.algos.maddpg",
    "haddpg": "pamarl.algos.haddpg",
    "hatd3": "pamarl.algos.hatd3",
    "iql": "pamarl.algos.iql",
    "vdn": "pamarl.algos.vdn",
    "qmix": "pamarl.algos.qmix",
    "mfq": "pamarl.algos.mfq",
    "il": "pamarl.algos.il",
    "mfac": "pamarl.algos.mfac",
    "ac": "pamarl.algos.ac",
}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    _ALGOS[cls.name] = cls
    return cls


def algorithms() -> dict[str, type[Algorithm]]:
    """Every algorithm whose module is present."""
    for name, mod in BUILTIN.items():
        if name not in _ALGOS:
            try:
                importlib.import_module(mod)
            except ModuleNotFoundError as e:
                if e.name != mod:  # a real import error inside an existing module must surface
                    raise
    return dict(sorted(_ALGOS.items()))


def get_algorithm(name: str) -> type[Algorithm]:
    algos = algorithms()
    if name not in algos:
        close = difflib.get_close_matches(name, list(algos), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UsageError(f"unknown algorithm {name!r}.{hint} Available: {', '.join(algos)}")
    return algos[name]
