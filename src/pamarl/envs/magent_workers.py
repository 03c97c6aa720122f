"""MAgent2 engine copies stepped in subprocesses: ``env_workers=W`` for the ``magent2/`` family.

The ``E`` copies are split into ``W`` contiguous, near-equal slices (as :class:`pamarl.envs.vector.VectorEnv`
splits them); each spawned worker holds one :class:`pamarl.envs.magent.MAgentEnv` over its slice, built with
``copy_offset`` = the slice's first index, so copy ``i`` is seeded and placed on its side exactly as copy ``i``
of an in-process env. The workers step in parallel and send numpy arrays back.

Opponents. ``script`` and ``none`` are deterministic per copy and run inside the workers. ``random``,
``self`` and ``checkpoint:PATH`` run here, in the learner's process, with one batched call per step over
all ``E`` copies (the workers take their actions as ``opponent=external``): the random opponent draws from
one generator as in-process, and a self-play opponent needs the learner's parameters, which live here.
So for a fixed seed a run gives the same numbers with ``env_workers=W`` as with ``env_workers=0``.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from pamarl.envs.base import BatchedEnv, BatchObs, BatchStep
from pamarl.envs.magent import batch_obs, batch_step
from pamarl.envs.magent_opponents import Opponent, make_opponent
from pamarl.errors import UsageError

IN_WORKER = ("script", "none")
"""Opponents computed inside the workers (deterministic, need the engine's state)."""

_META = ("spec", "n", "n_opp", "n_actions", "n_actions_opp", "role_obs_dim", "layouts", "view", "feat", "obs_dim",
         "map_size", "max_cycles", "two_teams", "info", "task", "minimap", "extra", "swap", "side")


def _worker(conn: Connection, task: str, num_envs: int, seed: int | None, kw: dict[str, Any]) -> None:
    import signal

    from pamarl.envs.magent import MAgentEnv

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop (see vector._worker)
    torch.set_num_threads(1)
    try:
        env = MAgentEnv(task, num_envs=num_envs, seed=seed, device="cpu", **kw)
    except BaseException as e:  # report construction errors to the parent instead of hanging
        conn.send(("error", f"{type(e).__name__}: {e}"))
        conn.close()
        return
    conn.send(("ok", {k: getattr(env, k) for k in _META}))
    while True:
        try:
            cmd, arg = conn.recv()
        except EOFError:
            break
        try:
            if cmd == "step":
                a, opp = arg
                if env.opponent is not None:  # in-worker opponent (script / none)
                    opp = env.opponent.act(env)
                conn.send(("ok", env.step_arrays(a, opp)))
            elif cmd == "reset":
                conn.send(("ok", (env.reset_arrays(arg), env.opponent_arrays(), env.side.copy())))
            elif cmd == "render":
                conn.send(("ok", env.render(arg)))
            elif cmd == "moves":
                conn.send(("ok", env.moves(arg)))
            elif cmd == "close":
                env.close()
                conn.send(("ok", None))
                break
        except BaseException as e:
            conn.send(("error", f"{type(e).__name__}: {e}"))
    conn.close()


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
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        self._slices: list[slice] = []
        self._closed = False
        ctx = mp.get_context("spawn")  # forking a process that has loaded torch is unsafe
        bounds = np.linspace(0, self.num_envs, self.workers + 1).round().astype(int)
        for w in range(self.workers):
            sl = slice(int(bounds[w]), int(bounds[w + 1]))
            wkw = {**kw, "copy_offset": sl.start, "opponent": opponent if in_worker else "external"}
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(child, task, sl.stop - sl.start, seed, wkw), daemon=True)
            p.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(p)
            self._slices.append(sl)
        metas = [self._recv(c) for c in self._conns]
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
    def _recv(self, conn: Connection) -> Any:
        try:
            status, payload = conn.recv()
        except EOFError as e:
            raise RuntimeError("a magent2 worker process died; see its traceback above") from e
        if status == "error":
            if payload.startswith("UsageError: "):
                raise UsageError(payload[len("UsageError: "):])
            raise RuntimeError(f"magent2 worker failed: {payload}")
        return payload

    def _broadcast(self, cmd: str, args: list[Any]) -> list[Any]:
        for conn, a in zip(self._conns, args):
            conn.send((cmd, a))
        return [self._recv(c) for c in self._conns]

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
        self._conns[0].send(("moves", role))
        return self._recv(self._conns[0])

    # ------------------------------------------------------------------ BatchedEnv
    def reset(self, seed: int | None = None) -> BatchObs:
        parts = self._broadcast("reset", [seed] * self.workers)
        self.side = np.concatenate([p[2] for p in parts])
        self._opp = self._cat([p[1] for p in parts]) if self.two_teams else None
        if seed is not None and self.opponent is not None:
            self.opponent.seed(seed)
        return batch_obs(self._cat([p[0] for p in parts]), self.n_actions, self.device)

    def step(self, actions: torch.Tensor) -> BatchStep:
        a = torch.as_tensor(actions).detach().cpu().numpy().astype(np.int32)
        if a.shape != (self.num_envs, self.n):
            raise UsageError(f"magent2/{self.task}: actions must be [E, N] = {(self.num_envs, self.n)}, "
                             f"got {tuple(a.shape)}")
        if a.size and (a.min() < 0 or a.max() >= self.n_actions):
            raise UsageError(f"magent2/{self.task}: actions must lie in [0, {self.n_actions})")
        if self._opp is None and self.two_teams:
            raise RuntimeError("MAgentEnv.step called before reset")
        opp = self.opponent.act(self) if self.opponent is not None else None  # type: ignore[arg-type]
        parts = self._broadcast("step", [(a[sl], None if opp is None else opp[sl]) for sl in self._slices])
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
        for conn, sl in zip(self._conns, self._slices):
            if sl.start <= index < sl.stop:
                conn.send(("render", index - sl.start))
                return self._recv(conn)
        raise IndexError(index)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for conn in self._conns:
            with contextlib.suppress(BrokenPipeError, EOFError, OSError):
                conn.send(("close", None))
                conn.recv()
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
