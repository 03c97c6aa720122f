"""Run ``E`` copies of a :class:`MultiAgentEnv` as one :class:`BatchedEnv`, in-process or in subprocesses.

The copies are split into groups; each group is stepped by :class:`EnvGroup` (plain numpy, so a
subprocess worker never imports torch). With ``workers=0`` one group runs in this process; with
``workers=W`` the copies are spread over ``W`` spawned processes that step in parallel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any, cast

import numpy as np

from pamarl.envs.base import BatchedEnv, BatchObs, BatchStep, EnvObs, EpisodeStats, MultiAgentEnv
from pamarl.envs.procs import Handlers, WorkerProcs, serve

EnvFn = Callable[[], MultiAgentEnv]
_OBS_KEYS = ("obs", "state", "action_mask", "active", "first")


def _stack_obs(items: Sequence[EnvObs]) -> dict[str, np.ndarray]:
    return {k: np.stack([getattr(o, k) for o in items]) for k in _OBS_KEYS if k != "first"}


class EnvGroup:
    """Steps a few env copies with auto-reset and per-episode accounting (numpy only)."""

    def __init__(self, env_fns: Sequence[EnvFn]):
        self.envs = [fn() for fn in env_fns]
        n = len(self.envs)
        n_agents = self.envs[0].spec.n_agents
        self.ep_return = np.zeros((n, n_agents), np.float64)
        self.ep_cost = np.zeros(n, np.float64)
        self.ep_len = np.zeros(n, np.int64)

    def reset(self, seeds: Sequence[int | None]) -> dict[str, np.ndarray]:
        self.ep_return[:] = 0.0
        self.ep_cost[:] = 0.0
        self.ep_len[:] = 0
        out = _stack_obs([env.reset(seed=s) for env, s in zip(self.envs, seeds)])
        out["first"] = np.ones(len(self.envs), bool)
        return out

    def step(self, actions: np.ndarray) -> dict[str, Any]:
        nxt, fin = [], []
        rewards, costs, term, trunc, episodes = [], [], [], [], []
        first = np.zeros(len(self.envs), bool)
        for j, env in enumerate(self.envs):
            st = env.step(actions[j])
            self.ep_return[j] += st.reward
            self.ep_len[j] += 1
            if st.cost is not None:
                self.ep_cost[j] += float(np.mean(st.cost))
            rewards.append(st.reward)
            costs.append(st.cost)
            term.append(st.terminated)
            trunc.append(st.truncated and not st.terminated)
            obs = EnvObs(st.obs, st.state, st.action_mask, st.active)
            fin.append(obs)
            if st.terminated or st.truncated:
                episodes.append(
                    EpisodeStats(
                        team_return=float(self.ep_return[j].sum()),
                        agent_returns=[float(x) for x in self.ep_return[j]],
                        length=int(self.ep_len[j]),
                        cost=float(self.ep_cost[j]),
                        truncated=bool(st.truncated and not st.terminated),
                    )
                )
                self.ep_return[j] = 0.0
                self.ep_cost[j] = 0.0
                self.ep_len[j] = 0
                obs = env.reset()
                first[j] = True
            nxt.append(obs)
        out: dict[str, Any] = {
            "next": {**_stack_obs(nxt), "first": first},
            "final": {**_stack_obs(fin), "first": np.zeros(len(self.envs), bool)},
            "reward": np.stack(rewards).astype(np.float32),
            # The envs of one group share a spec, so either all report a cost or none does.
            "cost": None if costs[0] is None else np.stack(cast("list[np.ndarray]", costs)).astype(np.float32),
            "terminated": np.asarray(term, bool),
            "truncated": np.asarray(trunc, bool),
            "episodes": episodes,
        }
        return out

    def render(self, index: int) -> np.ndarray | None:
        return self.envs[index].render()

    def close(self) -> None:
        for env in self.envs:
            env.close()


def _worker(conn: Connection, env_fns: Sequence[EnvFn]) -> None:
    def build() -> tuple[Any, Handlers, Callable[[], None]]:
        group = EnvGroup(env_fns)
        return group.envs[0].spec, {"step": group.step, "reset": group.reset, "render": group.render}, group.close

    serve(conn, build)


class VectorEnv(BatchedEnv):
    """``E`` copies of a :class:`MultiAgentEnv` behind the batched torch interface.

    Args:
        env_fns: one picklable factory per copy.
        workers: 0 steps every copy in this process; ``W > 0`` spreads them over ``W`` subprocesses.
    """

    def __init__(self, env_fns: Sequence[EnvFn], workers: int = 0):
        if not env_fns:
            raise ValueError("VectorEnv needs at least one env factory")
        self.num_envs = len(env_fns)
        self.workers = min(int(workers), self.num_envs)
        self._group: EnvGroup | None = None
        self._procs: WorkerProcs | None = None
        self._slices: list[slice] = []
        if self.workers <= 0:
            self._group = EnvGroup(env_fns)
            self.spec = self._group.envs[0].spec
        else:
            self._procs = WorkerProcs(_worker, self.num_envs, self.workers, lambda sl: (list(env_fns[sl]),),
                                      "environment")
            self._slices = self._procs.slices
            self.spec = self._procs.hellos[0]
        self._closed = False

    def _broadcast(self, cmd: str, args: Sequence[Any]) -> list[Any]:
        """``(cmd, args[w])`` to every worker, their answers in order (Ray workers override this)."""
        assert self._procs is not None
        return self._procs.broadcast(cmd, args)

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

    # ------------------------------------------------------------------ API
    def reset(self, seed: int | None = None) -> BatchObs:
        seeds = [None if seed is None else seed + i for i in range(self.num_envs)]
        if self._group is not None:
            return self._to_obs(self._group.reset(seeds))
        parts = self._broadcast("reset", [seeds[sl] for sl in self._slices])
        return self._to_obs({k: np.concatenate([p[k] for p in parts]) for k in _OBS_KEYS})

    def step(self, actions: Any) -> BatchStep:
        import torch

        acts = actions.detach().cpu().numpy() if isinstance(actions, torch.Tensor) else np.asarray(actions)
        if acts.shape[0] != self.num_envs:
            raise ValueError(f"step: expected actions for {self.num_envs} envs, got shape {tuple(acts.shape)}")
        if self._group is not None:
            out = self._group.step(acts)
        else:
            parts = self._broadcast("step", [acts[sl] for sl in self._slices])
            out = {
                "next": {k: np.concatenate([p["next"][k] for p in parts]) for k in _OBS_KEYS},
                "final": {k: np.concatenate([p["final"][k] for p in parts]) for k in _OBS_KEYS},
                "reward": np.concatenate([p["reward"] for p in parts]),
                "cost": None if parts[0]["cost"] is None else np.concatenate([p["cost"] for p in parts]),
                "terminated": np.concatenate([p["terminated"] for p in parts]),
                "truncated": np.concatenate([p["truncated"] for p in parts]),
                "episodes": [e for p in parts for e in p["episodes"]],
            }
        return BatchStep(
            next=self._to_obs(out["next"]),
            final=self._to_obs(out["final"]),
            reward=torch.from_numpy(out["reward"]),
            cost=None if out["cost"] is None else torch.from_numpy(out["cost"]),
            terminated=torch.from_numpy(out["terminated"]),
            truncated=torch.from_numpy(out["truncated"]),
            episodes=out["episodes"],
        )

    def render(self, index: int = 0) -> np.ndarray | None:
        if self._group is not None:
            return self._group.render(index)
        assert self._procs is not None
        return self._procs.ask_copy(index, "render")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._group is not None:
            self._group.close()
        if self._procs is not None:
            self._procs.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
