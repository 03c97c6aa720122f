"""Env copies stepped by Ray actors: ``env_workers=W env_backend=ray``.

:class:`RayVectorEnv` is :class:`pamarl.envs.vector.VectorEnv` with its ``W`` subprocess workers replaced
by ``W`` Ray actors (anywhere on the cluster: ``RAY_ADDRESS=auto`` or ``HOST:PORT`` to join one). Each
actor holds its share of the env copies as the same :class:`~pamarl.envs.vector.EnvGroup` that the local
path uses, so a run gives the same numbers as with ``env_workers=0`` for a fixed seed. The learner keeps the
policy: it acts on the gathered ``[E, N, ...]`` batch each step and sends every worker its actions.

A worker whose process or node dies is restarted by Ray (``max_restarts`` times); its env copies are then
reset, and the step that was lost counts as a truncation for them (reward 0; the last observation they
reported is the ``final`` one, so the learner bootstraps there as at a time limit). The run loses those
episodes' remainder, never env steps: every step of every copy is still counted and stored.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from pamarl.distributed.pool import RayPool, WorkerDied, WorkerRestarted
from pamarl.envs.base import BatchObs, BatchStep, EnvSpec
from pamarl.envs.procs import split
from pamarl.envs.vector import OBS_KEYS, EnvFn, EnvGroup, VectorEnv


class EnvWorker(EnvGroup):
    """An :class:`EnvGroup` that also answers for its spec and process id, and refuses to step before its
    first reset (a worker restarted after a death)."""

    def __init__(self, env_fns: Sequence[EnvFn]):
        super().__init__(env_fns)
        self.started = False

    def reset(self, seeds: Sequence[int | None]) -> dict[str, np.ndarray]:
        self.started = True
        return super().reset(seeds)

    def step(self, actions: np.ndarray) -> dict[str, Any]:
        if not self.started:
            raise WorkerRestarted("env worker restarted: its copies need a reset")
        return super().step(actions)

    def spec(self) -> EnvSpec:
        return self.envs[0].spec

    def pid(self) -> int:
        return os.getpid()


class RayVectorEnv(VectorEnv):
    """``E`` env copies over ``workers`` Ray actors, behind the batched torch interface."""

    def __init__(self, env_fns: Sequence[EnvFn], workers: int, cpus: float = 1.0, max_restarts: int = 3,
                 address: str | None = None):
        if not env_fns:
            raise ValueError("RayVectorEnv needs at least one env factory")
        self.num_envs = len(env_fns)
        self.workers = max(1, min(int(workers), self.num_envs))
        self._group = None
        self._procs = None
        self._slices = split(self.num_envs, self.workers)
        self.pool = RayPool(EnvWorker, [(list(env_fns[sl]),) for sl in self._slices], cpus=cpus,
                            max_restarts=max_restarts, address=address, name=f"pamarl-env-{os.getpid()}-{id(self)}")
        self.spec = self.pool.call_all("spec")[0]
        self._last: list[dict[str, np.ndarray] | None] = [None] * self.workers
        self._seeds: list[list[int | None]] = [[None] * (sl.stop - sl.start) for sl in self._slices]
        self.restarts = 0
        self._closed = False

    def _broadcast(self, cmd: str, args: Sequence[Any]) -> list[Any]:
        futs = [self.pool.submit(w, cmd, a) for w, a in enumerate(args)]
        out = []
        for w, f in enumerate(futs):
            try:
                part = self.pool.result(f)
            except WorkerDied:
                part = self._recover(w, cmd)
            if cmd == "reset":
                self._seeds[w] = list(args[w])
                self._last[w] = part
            elif cmd == "step":
                self._last[w] = part["next"]
            out.append(part)
        return out

    def _recover(self, w: int, cmd: str) -> Any:
        """Worker ``w`` died: wait for its restart, reset its copies; a lost step is a truncation."""
        self.restarts += 1
        self.pool.wait_alive(w)
        # Fresh seeds for the restarted copies: derived from the last reset's, never a repeat of them.
        seeds = [None if s is None else s + 7_919 * self.restarts for s in self._seeds[w]]
        obs = self.pool.result(self.pool.submit(w, "reset", seeds))
        if cmd == "reset":
            return obs
        n = self._slices[w].stop - self._slices[w].start
        last = self._last[w] if self._last[w] is not None else obs
        n_agents = self.spec.n_agents
        return {"next": obs, "final": last, "reward": np.zeros((n, n_agents), np.float32),
                "cost": np.zeros((n, n_agents), np.float32) if self.spec.has_cost else None,
                "terminated": np.zeros(n, bool), "truncated": np.ones(n, bool), "episodes": []}

    @staticmethod
    def _to_obs(d: dict[str, np.ndarray]) -> BatchObs:
        import torch

        return BatchObs(
            obs=torch.from_numpy(np.ascontiguousarray(d["obs"], dtype=np.float32)),
            state=torch.from_numpy(np.ascontiguousarray(d["state"], dtype=np.float32)),
            action_mask=torch.from_numpy(np.ascontiguousarray(d["action_mask"], dtype=bool)),
            active=torch.from_numpy(np.ascontiguousarray(d["active"], dtype=bool)),
            first=torch.from_numpy(np.ascontiguousarray(d["first"], dtype=bool)),
        )

    def reset(self, seed: int | None = None) -> BatchObs:
        seeds = [None if seed is None else seed + i for i in range(self.num_envs)]
        parts = self._broadcast("reset", [seeds[sl] for sl in self._slices])
        return self._to_obs({k: np.concatenate([p[k] for p in parts]) for k in OBS_KEYS})

    def step(self, actions: Any) -> BatchStep:
        import torch

        acts = actions.detach().cpu().numpy() if isinstance(actions, torch.Tensor) else np.asarray(actions)
        if acts.shape[0] != self.num_envs:
            raise ValueError(f"step: expected actions for {self.num_envs} envs, got shape {tuple(acts.shape)}")
        parts = self._broadcast("step", [acts[sl] for sl in self._slices])
        cat = {k: np.concatenate([p[k] for p in parts]) for k in ("reward", "terminated", "truncated")}
        return BatchStep(
            next=self._to_obs({k: np.concatenate([p["next"][k] for p in parts]) for k in OBS_KEYS}),
            final=self._to_obs({k: np.concatenate([p["final"][k] for p in parts]) for k in OBS_KEYS}),
            reward=torch.from_numpy(cat["reward"]),
            cost=None if parts[0]["cost"] is None else torch.from_numpy(np.concatenate([p["cost"] for p in parts])),
            terminated=torch.from_numpy(cat["terminated"]),
            truncated=torch.from_numpy(cat["truncated"]),
            episodes=[e for p in parts for e in p["episodes"]],
        )

    def pids(self) -> list[int]:
        return [int(p) for p in self.pool.call_all("pid")]

    def render(self, index: int = 0) -> np.ndarray | None:
        for w, sl in enumerate(self._slices):
            if sl.start <= index < sl.stop:
                return self.pool.result(self.pool.submit(w, "render", index - sl.start))
        raise IndexError(index)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.pool.close()

