"""Entry-point plug-ins: packages outside pamarl add algorithms (``pamarl.algorithms``) and env families
(``pamarl.envs``). Torch-free, so env workers can use it."""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from pamarl.errors import UsageError

_loaded: set[str] = set()


def load_plugins(group: str, on_object: Callable[[Any], None]) -> None:
    """Load every entry point of ``group`` not loaded yet and hand what it names to ``on_object``.

    A plug-in that fails to import is an error naming the plug-in and its distribution (a broken
    install should not silently lose algorithms)."""
    for ep in entry_points(group=group):
        key = f"{group}:{ep.name}:{ep.value}"
        if key in _loaded:
            continue
        try:
            obj = ep.load()
        except Exception as e:
            dist = getattr(ep.dist, "name", "?")
            raise UsageError(f"plug-in {ep.name!r} ({ep.value}, from the package {dist!r}) failed to load: "
                             f"{type(e).__name__}: {e}") from e
        _loaded.add(key)
        on_object(obj)
