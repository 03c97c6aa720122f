"""Configuration: one dataclass field per hyperparameter, YAML presets, ``key=value`` overrides.

A run is configured by :class:`TrainConfig` (what every algorithm shares: env, budget, logging) and
by the algorithm's own ``Config`` dataclass. Both live in one flat namespace on the command line
(``pamarl train ... lr=3e-4 num_envs=4``); ``run.key`` / ``algo.key`` may be written to be explicit.
A YAML file may be flat or have ``run:`` and ``algo:`` sections. Unknown keys are an error naming
the key and the nearest valid ones; values are parsed as YAML scalars and checked against the
field's type.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from pamarl.errors import UsageError


@dataclass
class TrainConfig:
    """Settings shared by every algorithm: task, budget, evaluation, logging, checkpoints."""

    algo: str = "progressive"
    """Algorithm name (``pamarl list`` shows them)."""
    env: str = "mpe/simple_spread_v3"
    """Env id ``family/task?param=value``."""
    steps: int = 300_000
    """Total environment steps (counted per env copy step: one step of E copies counts E)."""
    seed: int = 1
    """Seed of networks, sampling and environments."""
    num_envs: int = 8
    """Parallel environment copies E."""
    rollout_len: int = 200
    """Steps per env copy in each iteration (on-policy rollout length T)."""
    env_workers: int = 0
    """0: step the env copies in this process; W > 0: in W subprocesses (or W Ray actors: env_backend)."""
    env_inline: bool = False
    """With env_workers=W (local), this process steps a share of the copies too (W + 1 equal shares), in
    parallel with the workers, instead of waiting for them: on 2 cores env_workers=1 env_inline=true keeps both
    busy while the env steps. Same numbers as env_workers=0 for a fixed seed."""
    env_backend: str = "local"
    """Where env_workers run: local (subprocesses) or ray (Ray actors on the cluster of RAY_ADDRESS, else a
    local one; needs pamarl[ray]). Same numbers either way. Also where rollout_workers run (local: in this
    process, one after the other)."""
    rollout_workers: int = 0
    """0: the learner acts on the env copies itself. W > 0 (on-policy algorithms): W rollout workers, each with
    a share of the num_envs copies and a copy of the acting policy, collect the whole rollout and send it back
    once per iteration; env_backend=ray runs them as Ray actors, local in this process (same numbers for the
    same W; W changes the sampling streams, see pamarl.distributed.rollout)."""
    eval_every: int = 10
    """Evaluate every this many iterations (0: only at the end)."""
    eval_episodes: int = 10
    """Episodes per evaluation."""
    eval_deterministic: bool = True
    """Evaluate with the most likely action (greedy) instead of sampling."""
    checkpoint_every: int = 50
    """Write checkpoints/latest.pt every this many iterations (0: only the final one). Training envs
    are re-seeded and reset at each of these checkpoints so that a resumed run replays exactly."""
    checkpoint_minutes: float = 5.0
    """Also write checkpoints/latest.pt when this many minutes passed since the last one (0: off), so a
    killed run loses minutes. The envs are not reset there: a resume from such a checkpoint continues
    correctly but is not bit-identical to an uninterrupted run (one from a periodic checkpoint is)."""
    keep_checkpoints: bool = False
    """Also keep a numbered copy of every periodic checkpoint."""
    reward: str = "auto"
    """Which reward each agent trains on: 'team' (every agent gets the sum of the agents' rewards, HARL's
    convention), 'individual' (each agent its own), or 'auto' (team on cooperative tasks, individual on
    mixed ones). Mixers and team critics (VDN, QMIX, HADDPG, HATD3, critic=shared) always learn the summed
    team reward. config.yaml records the resolved value."""
    cost_limit: float | None = None
    """Per-episode cost limit on tasks with a cost (None: the env family's default)."""
    torch_threads: int = 1
    """torch intra-op threads; 1 is fastest on small machines (two threads fight the env for cores). More pay only
    when each has a core to itself: every op waits for all of them, so one busy core elsewhere slows training many
    times over (measured: 867 against 16,135 env steps/s with 2 threads vs 1 on a 2-core machine running one other
    job)."""
    device: str = "cpu"
    """torch device of the networks (and of natively batched envs): cpu, cuda, cuda:1, mps, ..."""
    tensorboard: bool = True
    """Also write TensorBoard event files."""
    progress: bool = True
    """Show a progress bar."""
    run_dir: str | None = None
    """Output directory (default: runs/<algo>-<task>-s<seed>-<time>)."""


    def validate(self) -> None:
        if self.reward not in ("auto", "team", "individual"):
            raise UsageError(f"reward must be 'auto', 'team' or 'individual', got {self.reward!r}")
        if self.env_backend not in ("local", "ray"):
            raise UsageError(f"env_backend must be 'local' or 'ray', got {self.env_backend!r}")
        check_device(self.device)


def check_device(name: str) -> None:
    """Refuse a torch device this machine does not have, saying which it has."""
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"device {name!r} is not a torch device name (e.g. cpu, cuda, cuda:0): {e}") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UsageError(f"device={name}: this machine has no CUDA GPU usable by torch "
                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use device=cpu")
        if dev.index is not None and dev.index >= n:
            raise UsageError(f"device={name}: only {n} CUDA device(s) here (cuda:0..cuda:{n - 1})")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UsageError(f"device={name}: MPS is not available on this machine; use device=cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"device={name}: unsupported device type {dev.type!r}; use cpu or cuda")


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass (the string literal under each field)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(src).body[0].body  # type: ignore[attr-defined]
        for a, b in zip(body, body[1:]):
            if (
                isinstance(a, ast.AnnAssign)
                and isinstance(a.target, ast.Name)
                and isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant)
                and isinstance(b.value.value, str)
            ):
                docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except UsageError as e:
                errors.append(str(e))
        raise UsageError(f"config key {key!r}: {value!r} fits none of {tp}")
    if origin is Literal:
        if value not in get_args(tp):
            raise UsageError(f"config key {key!r}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, list | tuple):
            value = [value]
        inner = get_args(tp)[0] if get_args(tp) else Any
        seq = [_coerce(v, inner, key) for v in value]
        return tuple(seq) if origin is tuple else seq
    if tp is Any:
        return value
    if tp is bool:
        from pamarl.validation import strict_bool

        b = strict_bool(value)
        if b is not None:
            return b
        raise UsageError(f"config key {key!r}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise UsageError(f"config key {key!r}: expected an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise UsageError(f"config key {key!r}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise UsageError(f"config key {key!r}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UsageError(f"config key {key!r}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, str):
            return value
        return str(value)
    return value


def build(cls: type, values: dict[str, Any], what: str) -> Any:
    """Instantiate dataclass ``cls`` from ``values``, checking names and types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in values.items():
        if k not in names:
            close = difflib.get_close_matches(k, names, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise UsageError(f"unknown {what} config key {k!r}.{hint} Valid keys: {', '.join(names)}")
        kwargs[k] = _coerce(v, hints[k], k)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UsageError(f"invalid {what} config: {e}") from e
    from pamarl.validation import check_config

    check_config(obj, what)  # ranges from one table (pamarl.validation.RULES), looked up by field name
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lr=3e-4", "hidden=[64,64]"]`` -> ``{"lr": 0.0003, "hidden": [64, 64]}`` (YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"override {item!r} is not of the form key=value")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"config file {str(p)!r} is a directory; give a YAML file (to continue a run in a "
                         "directory use --resume DIR)")
    if not p.is_file():
        raise UsageError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UsageError(f"config file {str(p)!r} is not valid YAML: {e}") from e
    except OSError as e:
        raise UsageError(f"config file {str(p)!r} cannot be read ({e.strerror}); check its permissions") from e
    if not isinstance(data, dict):
        raise UsageError(f"config file {str(p)!r} must hold a mapping of keys to values")
    flat: dict[str, Any] = {}
    for k, v in data.items():
        if k in ("run", "algo") and isinstance(v, dict):
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            flat[k] = v
    return flat


def preset_names() -> list[str]:
    """The presets shipped with pamarl (``src/pamarl/presets/<name>.yaml``)."""
    from importlib.resources import files

    # The folder also holds other data (compare presets, throughput tables): a run preset has ``algos:``.
    return sorted(p.name[:-5] for p in files("pamarl").joinpath("presets").iterdir()
                  if p.name.endswith(".yaml") and "algos" in (yaml.safe_load(p.read_text()) or {}))


def load_preset(name: str, algo: str) -> dict[str, Any]:
    """Flat ``run.``/``algo.`` keys of preset ``name`` for ``algo``.

    A preset file has a ``run:`` section (settings of the run) and an ``algos:`` section with one mapping
    per algorithm it covers (YAML anchors under ``common:`` share settings between them). Only what
    differs from pamarl's defaults need be written; ``docs/deviations.md`` says why each differs.
    """
    from importlib.resources import files

    names = preset_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UsageError(f"unknown preset {name!r}.{hint} Presets: {', '.join(names)}")
    doc = yaml.safe_load(files("pamarl").joinpath("presets", f"{name}.yaml").read_text()) or {}
    algos = doc.get("algos") or {}
    if algo not in algos:
        raise UsageError(f"preset {name!r} has no settings for algorithm {algo!r}; it covers {', '.join(algos)}")
    flat = {f"run.{k}": v for k, v in (doc.get("run") or {}).items()}
    flat.update({f"algo.{k}": v for k, v in algos[algo].items()})
    return flat


def split_keys(values: dict[str, Any], algo_cls: type | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Route flat keys to the run config or the algorithm config (``run.``/``algo.`` prefixes force)."""
    run_names = {f.name for f in dataclasses.fields(TrainConfig)}
    algo_names = {f.name for f in dataclasses.fields(algo_cls)} if algo_cls is not None else set()
    run_v: dict[str, Any] = {}
    algo_v: dict[str, Any] = {}
    for k, v in values.items():
        if k.startswith("run."):
            if k[4:] not in run_names and k[4:] in algo_names:
                raise UsageError(f"{k[4:]!r} is an algorithm key: put it under algo: (or at the top level), not run:")
            run_v[k[4:]] = v
        elif k.startswith("algo."):
            if k[5:] in run_names and k[5:] not in algo_names:
                raise UsageError(f"{k[5:]!r} is a run key: put it under run: (or at the top level), not algo:")
            algo_v[k[5:]] = v
        elif k in run_names:
            run_v[k] = v
        elif k in algo_names:
            algo_v[k] = v
        else:
            valid = sorted(run_names | algo_names)
            close = difflib.get_close_matches(k, valid, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise UsageError(
                f"unknown config key {k!r}.{hint} See `pamarl list --config <algo>` for the valid keys."
            )
    return run_v, algo_v


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as plain YAML-friendly values (tuples become lists)."""
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out
