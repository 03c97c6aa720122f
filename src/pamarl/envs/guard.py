"""Env failures with the env and the step named: building (:func:`build_env`) and stepping (:class:`GuardedEnv`).

A simulator that raises mid-run (a MuJoCo instability, a bug in a user's PettingZoo env, a worker
process that died) becomes :class:`~pamarl.errors.EnvError` saying which env id failed at which env
step, instead of a traceback from deep inside the simulator. A factory that fails while the env is
built (a bad parameter the family did not catch) becomes a :class:`~pamarl.errors.UsageError`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pamarl.envs.base import BatchedEnv, BatchObs, BatchStep
from pamarl.envs.registry import make_env
from pamarl.errors import EnvError, UsageError


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"


def build_env(env_id: str, **kw: Any) -> GuardedEnv:
    """:func:`~pamarl.envs.registry.make_env` whose failures name the env id and are user errors."""
    try:
        env = make_env(env_id, **kw)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - any factory failure is reported, with its cause
        raise UsageError(f"env {env_id!r} could not be built ({_why(e)}); check its parameters "
                         "(pamarl list shows the families and their tasks)") from e
    return GuardedEnv(env, env_id)


class GuardedEnv(BatchedEnv):
    """Delegates to ``env``; counts env steps so that an error can say where it happened."""

    def __init__(self, env: BatchedEnv, env_id: str):
        self.env = env
        self.env_id = env_id
        self.spec = env.spec
        self.num_envs = env.num_envs
        self.steps = 0

    def reset(self, seed: int | None = None) -> BatchObs:
        try:
            return self.env.reset(seed=seed)
        except (UsageError, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001
            raise EnvError(f"env {self.env_id!r} failed on reset (seed {seed}) after {self.steps:,} steps of "
                           f"{self.num_envs} copies: {_why(e)}") from e

    def step(self, actions: torch.Tensor) -> BatchStep:
        try:
            out = self.env.step(actions)
        except (UsageError, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001
            raise EnvError(f"env {self.env_id!r} failed at step {self.steps + 1:,} of its {self.num_envs} copies: "
                           f"{_why(e)}") from e
        self.steps += 1
        return out

    def render(self, index: int = 0) -> np.ndarray | None:
        return self.env.render(index)

    def close(self) -> None:
        self.env.close()

    def __getattr__(self, name: str) -> Any:
        if name == "env":  # not yet set (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.env, name)
