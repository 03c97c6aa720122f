"""The presets of ``pamarl compare`` (YAML files in ``presets/compare/``) and the measured throughputs
(``data/throughput.yaml``) behind ``--dry-run``'s time estimate; data, loaded when compare is imported."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pamarl.errors import UsageError

DEFAULT_EVALS = 50
"""Evaluations per run when the config does not fix ``eval_every``: enough points for T_conv and sigma."""


# ----------------------------------------------------------------------------- presets
PRESET_DIR = Path(__file__).parent / "presets" / "compare"
"""One YAML file per compare preset (``paper.yaml``, ``smoke.yaml``); the file name is the preset's name."""
THROUGHPUT_FILE = Path(__file__).parent / "data" / "throughput.yaml"
"""Measured env steps/s per (onpolicy|offpolicy, task or family), for ``--dry-run``'s time estimate."""


@dataclass(frozen=True)
class EnvPlan:
    """One env of a comparison with its budget and env-specific run settings."""

    env: str
    steps: int
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Preset:
    algos: tuple[str, ...]
    envs: tuple[EnvPlan, ...]
    seeds: int
    description: str
    overrides: dict[str, Any] = field(default_factory=dict)
    algo_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    evals: int = DEFAULT_EVALS


def load_preset(path: Path) -> Preset:
    """A compare preset from its YAML file (keys: description, algos, seeds, evals, overrides,
    algo_overrides, envs; keys starting with ``_`` hold YAML anchors and are ignored)."""
    doc = yaml.safe_load(path.read_text()) or {}
    known = {"description", "algos", "seeds", "evals", "overrides", "algo_overrides", "envs"}
    unknown = sorted(k for k in doc if k not in known and not str(k).startswith("_"))
    if unknown:
        raise UsageError(f"compare preset {path}: unknown keys {unknown}; valid keys are {sorted(known)}")
    return Preset(
        algos=tuple(doc["algos"]),
        envs=tuple(EnvPlan(str(e["env"]), int(e["steps"]), dict(e.get("overrides") or {})) for e in doc["envs"]),
        seeds=int(doc["seeds"]),
        description=str(doc.get("description", "")),
        overrides=dict(doc.get("overrides") or {}),
        algo_overrides={str(a): dict(v) for a, v in (doc.get("algo_overrides") or {}).items()},
        evals=int(doc.get("evals", DEFAULT_EVALS)),
    )


def load_presets() -> dict[str, Preset]:
    """Every preset in :data:`PRESET_DIR`, by name."""
    return {p.stem: load_preset(p) for p in sorted(PRESET_DIR.glob("*.yaml"))}


def load_throughput(path: Path = THROUGHPUT_FILE) -> dict[tuple[str, str], float]:
    """``{(kind, task or family): env steps/s}`` from the measured-throughput file (``default`` under key
    ``("default", "")``)."""
    doc = yaml.safe_load(path.read_text()) or {}
    table: dict[tuple[str, str], float] = {("default", ""): float(doc.get("default", 800.0))}
    for kind in ("onpolicy", "offpolicy"):
        for key, v in (doc.get(kind) or {}).items():
            table[(kind, str(key))] = float(v)
    return table


PRESETS: dict[str, Preset] = load_presets()
THROUGHPUT: dict[tuple[str, str], float] = load_throughput()


def expected_throughput(kind: str, env: str) -> float:
    """Env steps/s of one run of an ``onpolicy``/``offpolicy`` algorithm on ``env``, from :data:`THROUGHPUT`.

    The task's own measurement when there is one (query parameters ignored), else its family's (a safe
    family falls back to the plain one), else the file's default (800).
    """
    from pamarl.envs.registry import parse_env_id

    fam, task, _ = parse_env_id(env)
    for key in (f"{fam}/{task}", fam, fam.removeprefix("safe-")):
        if (kind, key) in THROUGHPUT:
            return THROUGHPUT[(kind, key)]
    return THROUGHPUT[("default", "")]
