"""Any importable PettingZoo ParallelEnv by id: ``pettingzoo/<module>:<factory>?param=value``.

Example: ``pettingzoo/pettingzoo.butterfly.pistonball_v6:parallel_env?n_pistons=4``. The factory is
looked up with ``importlib`` (no evaluation of text); its keyword arguments come from the query. The
learning team can be restricted with ``agents=a;b`` (other agents act randomly). From Python, pass a
ParallelEnv factory to :func:`pamarl.envs.generic.from_parallel_env` instead.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from pamarl.envs.pettingzoo import PettingZooEnv
from pamarl.envs.registry import EnvFamily, register_family
from pamarl.errors import UsageError
from pamarl.validation import Rule


def _import_factory(path: str) -> Callable[..., Any]:
    mod_name, sep, attr = path.partition(":")
    if not sep:
        attr = "parallel_env"
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        raise UsageError(f"pettingzoo/{path}: cannot import module {mod_name!r} ({e})") from e
    fn = getattr(mod, attr, None)
    if fn is None or not callable(fn):
        raise UsageError(f"pettingzoo/{path}: module {mod_name!r} has no callable {attr!r}")
    return fn


def make_generic(task: str, seed: int | None = None, agents: str | None = None, state: str = "auto",
                 cooperative: bool = True, **kw: Any) -> PettingZooEnv:
    """``cooperative=false`` declares a mixed task: ``reward=auto`` then keeps per-agent rewards."""
    factory = _import_factory(task)
    team = [a for a in str(agents).split(";") if a] if agents else None
    if not isinstance(cooperative, bool):
        raise UsageError(f"pettingzoo/{task}: cooperative must be true or false, got {cooperative!r}")
    return PettingZooEnv(lambda: factory(**kw), agents=team, state=state, seed=seed, cooperative=cooperative)


def from_parallel_env(factory: Callable[[], Any], num_envs: int = 1, workers: int = 0, **adapter_kw: Any):
    """Batch any ParallelEnv factory: ``from_parallel_env(lambda: my_env(), num_envs=8)``.

    With ``workers > 0`` the factory must be picklable (a top-level function or ``functools.partial``).
    """
    import functools

    from pamarl.envs.vector import VectorEnv

    fns = [functools.partial(PettingZooEnv, factory, **adapter_kw) for _ in range(num_envs)]
    return VectorEnv(fns, workers=workers)


register_family(
    EnvFamily(
        name="pettingzoo",
        description="any PettingZoo ParallelEnv: pettingzoo/<module>:<factory>?kwarg=value",
        tasks={"<module>:<factory>": "e.g. pettingzoo/mpe2.simple_spread_v3:parallel_env?N=2"},
        open_tasks=True,
        make_single=make_generic,
        runs_code=True,
        params={"agents": Rule(str), "state": Rule(str)},
    )
)
