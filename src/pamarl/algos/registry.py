"""Algorithm registry: ``@register`` on the class; names resolve lazily to their modules.

Packages outside pamarl add algorithms through the ``pamarl.algorithms`` entry-point group, e.g. in
their ``pyproject.toml``::

    [project.entry-points."pamarl.algorithms"]
    my_algo = "my_package.my_algo:MyAlgo"

The entry point may name an :class:`~pamarl.algos.base.Algorithm` subclass (registered under its
``name``) or a module that calls ``@register`` itself. Entry points are loaded on first use.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from pamarl.algos.base import Algorithm
from pamarl.errors import UsageError
from pamarl.plugins import load_plugins

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
    "dqn_avg": "pamarl.algos.dqn_avg",
    "mfq": "pamarl.algos.mfq",
    "il": "pamarl.algos.il",
    "mfac": "pamarl.algos.mfac",
    "ac": "pamarl.algos.ac",
}


ENTRY_POINT_GROUP = "pamarl.algorithms"


def register(cls: type[Algorithm]) -> type[Algorithm]:
    _ALGOS[cls.name] = cls
    return cls


def _register_plugin(obj: Any) -> None:
    if isinstance(obj, type) and issubclass(obj, Algorithm):
        register(obj)
    # a module: importing it ran its @register decorators


def algorithms() -> dict[str, type[Algorithm]]:
    """Every algorithm whose module is present, built in or from a plug-in package."""
    for name, mod in BUILTIN.items():
        if name not in _ALGOS:
            try:
                importlib.import_module(mod)
            except ModuleNotFoundError as e:
                if e.name != mod:  # a real import error inside an existing module must surface
                    raise
    load_plugins(ENTRY_POINT_GROUP, _register_plugin)
    return dict(sorted(_ALGOS.items()))


def get_algorithm(name: str) -> type[Algorithm]:
    algos = algorithms()
    if name not in algos:
        close = difflib.get_close_matches(name, list(algos), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UsageError(f"unknown algorithm {name!r}.{hint} Available: {', '.join(algos)}")
    return algos[name]
