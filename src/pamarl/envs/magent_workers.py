"""MAgent2 engine copies stepped in subprocesses: ``env_workers=W`` for the ``magent2/`` family.

The ``E`` copies are split into ``W`` contiguous, near-equal slices by :mod:`pamarl.envs.procs` (as for
:class:`pamarl.envs.vector.VectorEnv`); each spawned worker holds one :class:`pamarl.envs.magent.MAgentEnv`
over its slice, built with ``copy_offset`` = the slice's first index, so copy ``i`` is seeded and placed on
its side exactly as copy ``i`` of an in-process env. The workers step in parallel and send numpy arrays back.

Opponents. ``script`` and ``none`` are deterministic per copy and run inside the workers. ``random``,
``self`` and ``checkpoint:PATH`` run here, in the learner's process, with one batched call per step over
all ``E`` copies (the workers take their actions as ``opponent=external``): the random opponent draws from
one generator as in-process, and a self-play opponent needs the learner's parameters, which live here.
So for a fixed seed a run gives the same numbers with ``env_workers=W`` as with ``env_workers=0``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from pamarl.envs.base import BatchedEnv, BatchObs, BatchStep
from pamarl.envs.magent import batch_obs, batch_step, check_actions
from pamarl.envs.magent_opponents import Opponent, make_opponent
from pamarl.envs.procs import Handlers, WorkerProcs, serve
from pamarl.errors import UsageError

IN_WORKER = ("script", "none")
"""Opponents computed inside the workers (deterministic, need the engine's state)."""

_META = ("spec", "n", "n_opp", "n_actions", "n_actions_opp", "role_obs_dim", "layouts", "view", "feat", "obs_dim",
         "map_size", "max_cycles", "two_teams", "info", "task", "minimap", "extra", "swap", "side")


def _worker(conn: Connection, task: str, num_envs: int, seed: int | None, kw: dict[str, Any]) -> None:
    def build() -> tuple[Any, Handlers, Callable[[], None]]:
        from pamarl.envs.magent import MAgentEnv

        torch.set_num_threads(1)
        env = MAgentEnv(task, num_envs=num_envs, seed=seed, device="cpu", **kw)

        def step(arg: tuple[np.ndarray, np.ndarray | None]) -> Any:
            a, opp = arg
            if env.opponent is not None:  # in-worker opponent (script / none)
                opp = env.opponent.act(env)
            return env.step_arrays(a, opp)

        handlers: Handlers = {
            "step": step,
            "reset": lambda seed: (env.reset_arrays(seed), env.opponent_arrays(), env.side.copy()),
            "render": env.render,
            "moves": env.moves,
        }
        return {k: getattr(env, k) for k in _META}, handlers, env.close

    serve(conn, build)


class MAgentWorkers(BatchedEnv):
    """``E`` MAgent2 copies over ``W`` subprocesses, behind the same interface as :class:`MAgentEnv`
    (``outcomes``, ``side``, ``attach_learner``, ``opponent_obs``, ``render``)."""

    # Copied from the first worker's MAgentEnv (``_META``), declared here for the type checker.
    n: int
    n_actions: int
    two_teams: bool
    task: str

    def __init__(self, task: str, num_envs: int = 1, workers: int = 1, seed: int | None = None,
                 device: str = "cpu", opponent: str = "random", opponent_explore: bool = False,
                 self_refresh: int = 50, self_pool: int = 1, **kw: Any):
        if workers < 1:
            raise UsageError(f"magent2/{task}: workers must be >= 1, got {workers}")
        self.num_envs = int(num_envs)
        self.workers = min(int(workers), self.num_envs)
        self.device = torch.device(device)
        opponent = str(opponent)
        in_worker = opponent in IN_WORKER
        worker_kw = {**kw, "opponent": opponent if in_worker else "external"}
        self._procs = WorkerProcs(
            _worker, self.num_envs, self.workers,
            lambda sl: (task, sl.stop - sl.start, seed, {**worker_kw, "copy_offset": sl.start}), "magent2")
        self._slices = self._procs.slices
        metas = self._procs.hellos
        for k in _META:
            setattr(self, k, metas[0][k])
        self.side = np.concatenate([m["side"] for m in metas])
        if not self.two_teams and opponent not in ("random", "none"):
            self.close()
            raise UsageError(f"magent2/{task} has one team; it takes no opponent (got opponent={opponent!r})")
        self.opponent: Opponent | None = None
        if self.two_teams and not in_worker:
            try:
                self.opponent = make_opponent(opponent, self, explore=bool(opponent_explore),  # type: ignore[arg-type]
                                              refresh=int(self_refresh), pool=int(self_pool))
            except BaseException:
                self.close()
                raise
        self.outcomes: list[dict[str, float]] = []
        self._opp: dict[str, np.ndarray] | None = None

    # ------------------------------------------------------------------ plumbing
    @staticmethod
    def _cat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    # ------------------------------------------------------------------ opponent policies (this process)
    def opponent_obs(self) -> BatchObs:
        """The opponent team's current observation (role 1), for opponent policies."""
        if self._opp is None:
            raise RuntimeError("MAgentWorkers: no opponent observation before reset (or one-team task)")
        return batch_obs(self._opp, self.n_actions, self.device)

    def attach_learner(self, algo: Any) -> None:
        """Give a self-play opponent the learner whose lagged copy it plays (called by the runner)."""
        if self.opponent is not None:
            self.opponent.attach(algo, self)  # type: ignore[arg-type]

    def moves(self, role: int) -> np.ndarray:
        """``[A, 2]`` (dx, dy) of each action of ``role``'s agents (see :meth:`MAgentEnv.moves`)."""
        return self._procs.ask(0, "moves", role)

    # ------------------------------------------------------------------ BatchedEnv
    def reset(self, seed: int | None = None) -> BatchObs:
        parts = self._procs.broadcast("reset", [seed] * self.workers)
        self.side = np.concatenate([p[2] for p in parts])
        self._opp = self._cat([p[1] for p in parts]) if self.two_teams else None
        if seed is not None and self.opponent is not None:
            self.opponent.seed(seed)
        return batch_obs(self._cat([p[0] for p in parts]), self.n_actions, self.device)

    def step(self, actions: torch.Tensor) -> BatchStep:
        a = check_actions(actions, self.task, self.num_envs, self.n, self.n_actions)
        if self._opp is None and self.two_teams:
            raise RuntimeError("MAgentEnv.step called before reset")
        opp = self.opponent.act(self) if self.opponent is not None else None  # type: ignore[arg-type]
        parts = self._procs.broadcast("step", [(a[sl], None if opp is None else opp[sl]) for sl in self._slices])
        out: dict[str, Any] = {k: self._cat([p[k] for p in parts]) for k in ("next", "final")}
        for k in ("reward", "terminated", "truncated", "side"):
            out[k] = np.concatenate([p[k] for p in parts])
        out["episodes"] = [ep for p in parts for ep in p["episodes"]]
        self.side = out["side"]
        if self.two_teams:
            self._opp = self._cat([p["opponent_next"] for p in parts])
        for p in parts:
            for o in p["outcomes"]:
                self.outcomes.append(o)
                if self.opponent is not None:  # in episode order, as the in-process env calls it
                    self.opponent.episode_finished(self)  # type: ignore[arg-type]
        return batch_step(out, self.n_actions, self.device)

    def render(self, index: int = 0) -> np.ndarray | None:
        return self._procs.ask_copy(index, "render")

    def close(self) -> None:
        self._procs.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
