"""Environment ids and families.

An env id is ``family/task`` with optional parameters in query form, for example
``mpe/simple_spread_v3``, ``mpe/simple_spread_v3?N=4&continuous=true`` or
``matrix/homogeneity_trap?n=4``. Parameter values are parsed as YAML scalars (numbers, booleans,
strings); nothing is evaluated.

Packages outside pamarl add env families through the ``pamarl.envs`` entry-point group; the entry point
names an :class:`EnvFamily` (registered) or a module that calls :func:`register_family` itself::

    [project.entry-points."pamarl.envs"]
    my_family = "my_package.envs:FAMILY"

This module never imports torch: subprocess env workers import it to rebuild their env copies.
"""

from __future__ import annotations

import difflib
import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import yaml

from pamarl.errors import UsageError
from pamarl.validation import Rule, check_params

if TYPE_CHECKING:
    from pamarl.envs.base import BatchedEnv, MultiAgentEnv


@dataclass
class EnvFamily:
    """A family of tasks sharing one adapter.

    Exactly one of ``make_single`` (one numpy copy; the library vectorises it) and ``make_batched``
    (a natively batched simulator) is given.
    """

    name: str
    description: str
    tasks: dict[str, str] = field(default_factory=dict)
    """Known task names with a one-line description (listed by ``pamarl list``)."""
    open_tasks: bool = False
    """Accept task names outside ``tasks`` (e.g. any importable PettingZoo env)."""
    make_single: Callable[..., MultiAgentEnv] | None = None
    make_batched: Callable[..., BatchedEnv] | None = None
    batched_workers: bool = False
    """``make_batched`` takes ``workers=W`` and spreads its copies over ``W`` subprocesses itself."""
    extra: str | None = None
    """The optional dependency group (``pip install pamarl[extra]``) the family needs, if any."""
    default_cost_limit: float | None = None
    """Per-episode cost limit used when a run does not set ``cost_limit`` (tasks with a cost)."""
    cost_limit_for: Callable[[dict[str, Any]], float] | None = None
    """The default cost limit for given id parameters (e.g. scaled to ``?episode_limit=``); wins over
    ``default_cost_limit`` when set."""

    params: dict[str, Rule] = field(default_factory=dict)
    """Type and range of the known ``?key=value`` parameters (:mod:`pamarl.validation`); others pass as given."""
    runs_code: bool = False
    """The task names a Python callable that is imported and run: such ids are never taken from a file
    without the user's say-so (:func:`check_trusted`)."""

    def cost_limit(self, params: dict[str, Any]) -> float | None:
        """The default per-episode cost limit of a task with these id parameters (None: no default)."""
        if self.cost_limit_for is not None:
            return float(self.cost_limit_for(params))
        return self.default_cost_limit


_FAMILIES: dict[str, EnvFamily] = {}
# Built-in families register themselves when their module is imported; this maps each family to it
# so that ids resolve without importing every simulator up front.
_BUILTIN_MODULES = {
    "mpe": "pamarl.envs.mpe",
    "mpe-torch": "pamarl.envs.mpe_torch",
    "matrix": "pamarl.envs.matrix",
    "pettingzoo": "pamarl.envs.generic",
    "mamujoco": "pamarl.envs.mamujoco",
    "safe-mamujoco": "pamarl.envs.mamujoco",
    "magent2": "pamarl.envs.magent",
}


def register_family(family: EnvFamily) -> EnvFamily:
    _FAMILIES[family.name] = family
    return family


ENTRY_POINT_GROUP = "pamarl.envs"


def _register_plugin(obj: Any) -> None:
    if isinstance(obj, EnvFamily):
        register_family(obj)


def _load_plugins() -> None:
    from pamarl.plugins import load_plugins

    load_plugins(ENTRY_POINT_GROUP, _register_plugin)


def _load(name: str) -> EnvFamily | None:
    if name not in _FAMILIES and name in _BUILTIN_MODULES:
        try:
            importlib.import_module(_BUILTIN_MODULES[name])
        except ModuleNotFoundError:
            return None
    if name not in _FAMILIES:
        _load_plugins()
    return _FAMILIES.get(name)


def families(load: bool = True) -> dict[str, EnvFamily]:
    """All registered families (importing the built-in ones whose dependencies are installed, and plug-ins)."""
    if load:
        for name in _BUILTIN_MODULES:
            _load(name)
        _load_plugins()
    return dict(_FAMILIES)


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=3, cutoff=0.5)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def parse_env_id(env_id: str) -> tuple[str, str, dict[str, Any]]:
    """Split ``family/task?k=v&...`` into its parts, parsing each value as a YAML scalar."""
    base, _, query = env_id.partition("?")
    if "/" not in base:
        raise UsageError(
            f"env id {env_id!r} has no family: write it as family/task, e.g. 'mpe/simple_spread_v3'. "
            f"Families: {', '.join(sorted(families()))}"
        )
    family, task = base.split("/", 1)
    params: dict[str, Any] = {}
    for k, v in parse_qsl(query, keep_blank_values=True):
        try:
            params[k] = yaml.safe_load(v) if v != "" else ""
        except yaml.YAMLError:
            params[k] = v
    return family, task, params


def resolve(env_id: str) -> tuple[EnvFamily, str, dict[str, Any]]:
    """Look up an env id, raising :class:`UsageError` with the nearest valid names if unknown."""
    fam_name, task, params = parse_env_id(env_id)
    fam = _load(fam_name)
    if fam is None:
        if fam_name in _BUILTIN_MODULES:
            raise UsageError(
                f"env family {fam_name!r} needs an optional dependency that is not installed: "
                f"pip install 'pamarl[{_extra_of(fam_name)}]'"
            )
        raise UsageError(
            f"unknown env family {fam_name!r}.{_suggest(fam_name, list(families()))} "
            f"Known families: {', '.join(sorted(families()))}"
        )
    if not fam.open_tasks and task not in fam.tasks:
        raise UsageError(
            f"unknown task {task!r} in env family {fam_name!r}.{_suggest(task, list(fam.tasks))} "
            f"Known tasks: {', '.join(sorted(fam.tasks))}"
        )
    return fam, task, check_params(params, fam.params, env_id)


def check_trusted(env_id: str, source: str, restated: str | None = None, trust: bool = False) -> None:
    """Refuse an env id read from ``source`` (a file) that would import and run Python code.

    Such an id (``pettingzoo/<module>:<callable>``) is accepted only when the user re-states it on the
    command line (``restated``, e.g. ``--env``) or trusts the file (``trust``, ``--trust-env-code``).
    Other ids build envs from the installed families only and pass.
    """
    fam_name = parse_env_id(env_id)[0]
    fam = _load(fam_name)
    if fam is None or not fam.runs_code or trust or restated == env_id:
        return
    raise UsageError(
        f"{source} names the env {env_id!r}, which imports and runs Python code ({fam_name}/<module>:<callable>). "
        "Nothing read from a run directory, checkpoint or comparison folder runs code unasked: re-state the env "
        f"on the command line (--env '{env_id}') or pass --trust-env-code if you trust where the file came from"
    )


def missing_extra(env_id: str) -> str | None:
    """The optional dependency group an env id needs but lacks here (``"mujoco"``), else None.

    Raises :class:`UsageError` for an id that is wrong (unknown family or task), so callers can tell
    "cannot run on this install" from "typo".
    """
    fam_name = parse_env_id(env_id)[0]
    if fam_name in _BUILTIN_MODULES and _load(fam_name) is None:
        return _extra_of(fam_name)
    resolve(env_id)
    return None


def _extra_of(family: str) -> str:
    extras = {"mamujoco": "mujoco", "safe-mamujoco": "mujoco", "magent": "magent", "magent2": "magent"}
    return extras.get(family, family)


def _make_single(family: str, task: str, params: dict[str, Any], seed: int | None) -> MultiAgentEnv:
    """Top-level (hence picklable) factory used by subprocess workers."""
    fam = _load(family)
    if fam is None or fam.make_single is None:
        raise UsageError(f"env family {family!r} cannot build single env copies")
    try:
        return fam.make_single(task, seed=seed, **params)
    except TypeError as e:
        raise UsageError(f"env {family}/{task}: bad parameter ({e})") from e


def make_env(
    env_id: str,
    num_envs: int = 1,
    workers: int = 0,
    seed: int | None = None,
    device: str = "cpu",
    backend: str = "local",
    inline: bool = False,
    **overrides: Any,
) -> BatchedEnv:
    """Build ``num_envs`` copies of the task ``env_id`` as one :class:`BatchedEnv`.

    Args:
        env_id: ``family/task?param=value&...``.
        num_envs: parallel copies ``E``.
        workers: 0 steps the copies in this process; ``W > 0`` in ``W`` subprocesses (``backend="local"``)
            or ``W`` Ray actors (``backend="ray"``, :mod:`pamarl.distributed.ray_env`).
        seed: construction seed (copies are re-seeded on ``reset(seed)``).
        inline: with ``W > 0`` local workers, this process steps a share of the copies too (``W + 1`` shares),
            in parallel with the workers, instead of waiting for them.
        overrides: extra env parameters, merged over the id's query parameters.
    """
    if num_envs < 1:
        raise UsageError(f"num_envs must be at least 1, got {num_envs}")
    fam, task, params = resolve(env_id)
    params = {**params, **overrides}
    if fam.make_batched is not None:
        if inline and workers > 0:
            raise UsageError(f"env {env_id}: env_inline is for families stepped copy by copy (mpe/, mamujoco/, "
                             f"pettingzoo/...); {fam.name}/ steps its copies as one batch: set env_inline=false")
        if fam.batched_workers and workers > 0:
            if backend != "local":
                raise UsageError(f"env {env_id}: its subprocess workers are local only; set env_backend=local")
            params = {**params, "workers": workers}
        try:
            return fam.make_batched(task, num_envs=num_envs, seed=seed, device=device, **params)
        except TypeError as e:
            raise UsageError(f"env {env_id}: bad parameter ({e})") from e
    from pamarl.envs.vector import VectorEnv

    fns = [
        functools.partial(_make_single, fam.name, task, params, None if seed is None else seed + i)
        for i in range(num_envs)
    ]
    if backend not in ("local", "ray"):
        raise UsageError(f"env_backend must be 'local' or 'ray', got {backend!r}")
    if workers > 0 and backend == "ray":
        fns[0]().close()  # fail fast here on a bad parameter, with a clear message, before starting actors
        from pamarl.distributed.ray_env import RayVectorEnv

        return RayVectorEnv(fns, workers=workers)
    return VectorEnv(fns, workers=workers, inline=inline)
