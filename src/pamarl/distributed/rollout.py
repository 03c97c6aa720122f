"""Rollout workers for the on-policy family: ``rollout_workers=W [env_backend=ray]``.

Each of the ``W`` workers (:class:`RolloutWorker`) holds its share of the run's ``num_envs`` env copies (the
same contiguous split as ``env_workers``: copy ``i`` is built and reset with the seeds it has in the
in-process path) and a copy of the acting policy, the algorithm's own :meth:`act` (the actor: the learner
evaluates the critics on the whole rollout when it prepares the update). Once per iteration the
learner (:class:`RolloutCollector`, the runner's collection hook, :mod:`pamarl.collect`) sends every worker the
current weights in one message (``ray.put`` once, read by every actor); each worker collects its whole part of
the rollout (``rollout_len`` steps of its copies) and sends it back in one message; the learner feeds the
steps, in order, to the algorithm's :meth:`observe` and updates. Logged metrics are the in-process loop's
(episodes in step order, copies in index order within a step; coordination over the sampled actions), plus
``rollout/restarts``: worker restarts since the previous row.

``env_backend=ray`` runs the workers as Ray actors (one CPU each, anywhere on the cluster of ``RAY_ADDRESS``,
else a local one); ``env_backend=local`` runs the very same workers in this process, one after the other:
the reference the Ray path is tested against, and the path that needs no Ray.

Sampling randomness. Worker ``w`` samples its actions from its own generator, re-seeded at every iteration
from ``(seed, iteration, w)`` (:func:`rollout_seed`). Why this and not noise drawn on the learner: the local
backend then runs exactly what the Ray actors run (the same inputs, the same ``[E_w, N]`` batch shapes in
the forward passes, the same noise), so the same ``W`` gives bit-identical numbers on both backends, and
nothing about sampling is state: a resumed run or a restarted worker draws, for an iteration, the stream the
uninterrupted run drew, so exact resume needs only what the runner already checkpoints (the envs are reset
at periodic checkpoints as always). Shipping noise would make the backends agree too, but still needs the
per-share forward passes and adds ``T x E x N x A`` numbers to every message. The price: ``W`` is part of a
run's identity, like its seed (``W=1`` and ``W=2`` draw different streams), and ``rollout_workers=0``, where
the learner samples one ``[E, N]`` batch from its own generator, gives other, equally valid numbers. Workers
on nodes with another CPU type may round matrix products differently in the last bits.

Fault tolerance. A worker whose process or node dies is restarted by Ray (up to :data:`MAX_RESTARTS` times);
the learner waits for it, resets its env copies with fresh seeds derived from the last reset's, and asks it
again for its part of the iteration with the same weights message. The iteration is always whole, so the
committed env steps are those of an uninterrupted run; the episodes that were in flight on the dead worker's
copies are lost (never logged), and the rest of the run continues from the new episodes, so its numbers
differ from an uninterrupted run's (the env state that was lost cannot be replayed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from pamarl.algos.base import ActOut, Algorithm
from pamarl.collect import Collected, Collector, Shape, step_logp
from pamarl.config import TrainConfig
from pamarl.distributed.pool import WorkerDied, WorkerRestarted, make_pool
from pamarl.envs.base import BatchObs, BatchStep, EnvSpec
from pamarl.errors import TrainingError, UsageError
from pamarl.validation import check_rollout_workers

MAX_RESTARTS = 3
"""Times Ray restarts one rollout worker, and times the learner asks a restarted worker again in one iteration."""
_OBS = ("obs", "state", "action_mask", "active", "first")
_OUT = ("env_action", "action", "logp")
POLICY_PARTS = ("actor",)
"""The modules of an :class:`~pamarl.algos.onpolicy.OnPolicyAlgorithm` that its ``act`` reads (every on-policy
algorithm acts with the base class's ``act``; one that reads more would have to add it here)."""


def rollout_seed(seed: int, iteration: int, worker: int) -> int:
    """Seed of worker ``worker``'s sampling generator at ``iteration`` (distinct for every pair of a run)."""
    return (seed * 1_000_003 + iteration * 9_973 + worker * 7_919 + 31) % (2**31 - 1)


def split(num_envs: int, workers: int) -> list[slice]:
    """The env copies of each worker: ``workers`` contiguous, near-equal shares (as ``env_workers`` splits)."""
    bounds = np.linspace(0, num_envs, workers + 1).round().astype(int)
    return [slice(int(bounds[w]), int(bounds[w + 1])) for w in range(workers)]


def acting_state(algo: Algorithm) -> dict[str, Any]:
    """The weights the acting policy needs (:data:`POLICY_PARTS`), as CPU tensors to send to workers."""
    out: dict[str, Any] = {}
    for name in POLICY_PARTS:
        module = getattr(algo, name, None)
        out[name] = None if module is None else {k: v.detach().cpu() for k, v in module.state_dict().items()}
    return out


def _required(part: dict[str, torch.Tensor | None], key: str) -> torch.Tensor:
    """A field every :class:`ActOut` has."""
    v = part[key]
    assert v is not None, key
    return v


@contextlib.contextmanager
def _global_rngs_untouched() -> Iterator[None]:
    """Building env copies and a policy copy here leaves this process's global RNGs (torch, numpy, random) as
    they were: with in-process workers the learner then starts from the parameters it has with Ray workers
    (and with ``rollout_workers=0``)."""
    state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(state[0])
        np.random.set_state(state[1])
        random.setstate(state[2])


def _stack(items: Sequence[BatchObs]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([getattr(o, k) for o in items]) for k in _OBS}


class RolloutWorker:
    """``count`` env copies (global indices ``start..start+count-1``) and a CPU copy of the acting policy."""

    def __init__(self, index: int, run: TrainConfig, algo_cfg: Any, start: int, count: int):
        from pamarl.algos.registry import get_algorithm
        from pamarl.envs.guard import build_env

        torch.set_num_threads(max(1, run.torch_threads))
        self.index, self.start, self.seed, self.rollout_len = index, start, run.seed, run.rollout_len
        with _global_rngs_untouched():
            self.env = build_env(run.env, num_envs=count, workers=0, seed=run.seed + start, device="cpu")
            self.spec = self.env.spec
            mine = dataclasses.replace(run, device="cpu", num_envs=count, env_workers=0, rollout_workers=0)
            self.algo = get_algorithm(run.algo)(self.spec, algo_cfg, mine, torch.device("cpu"))
        self.obs: BatchObs | None = None

    def pid(self) -> int:
        return os.getpid()

    def reset(self, seed: int) -> None:
        """Reset the copies as the run's copies ``start..``: copy ``i`` with ``seed + i``."""
        self.obs = self.env.reset(seed=seed + self.start)

    def collect(self, policy: dict[str, Any], iteration: int) -> dict[str, Any]:
        """Load ``policy`` and collect ``rollout_len`` steps of every copy; everything ``[T(+1), E_w, ...]``."""
        if self.obs is None:
            raise WorkerRestarted(f"rollout worker {self.index} restarted: its env copies need a reset")
        for name in POLICY_PARTS:
            module = getattr(self.algo, name, None)
            if module is not None and policy.get(name) is not None:
                module.load_state_dict(policy[name])
        self.algo.generator = torch.Generator().manual_seed(rollout_seed(self.seed, iteration, self.index))
        obs = [self.obs]
        finals: list[BatchObs] = []
        outs: list[ActOut] = []
        steps: list[BatchStep] = []
        for _ in range(self.rollout_len):
            out = self.algo.act(obs[-1], explore=True)
            st = self.env.step(out.env_action)
            outs.append(out)
            steps.append(st)
            finals.append(st.final)
            obs.append(st.next)
        self.obs = obs[-1]
        return {
            "obs": _stack(obs), "final": _stack(finals),
            "out": {k: None if getattr(outs[0], k) is None else torch.stack([getattr(o, k) for o in outs])
                    for k in _OUT},
            "reward": torch.stack([s.reward for s in steps]),
            "cost": None if steps[0].cost is None else torch.stack([s.cost for s in steps if s.cost is not None]),
            "terminated": torch.stack([s.terminated for s in steps]),
            "truncated": torch.stack([s.truncated for s in steps]),
            "episodes": [s.episodes for s in steps],
        }

    def close(self) -> None:
        self.env.close()


class RolloutCollector(Collector):
    """The runner's collection hook over ``rollout_workers`` workers (in this process or Ray actors)."""

    def __init__(self, run: TrainConfig, algo_cfg: Any):
        from pamarl.envs.guard import build_env

        check_rollout_workers(run)
        with _global_rngs_untouched():  # fail here, clearly, on an env the workers cannot run
            probe = build_env(run.env, num_envs=1, workers=0, seed=run.seed, device="cpu")
        try:
            if getattr(probe, "attach_learner", None) is not None:
                raise UsageError(f"rollout_workers: {run.env!r} plays against an opponent that follows the learner "
                                 "in this process (attach_learner); use rollout_workers=0")
            self.spec: EnvSpec = probe.spec
        finally:
            probe.close()
        self.num_envs, self.rollout_len = run.num_envs, run.rollout_len
        self.slices = split(run.num_envs, run.rollout_workers)
        args = [(w, run, algo_cfg, sl.start, sl.stop - sl.start) for w, sl in enumerate(self.slices)]
        self.pool = make_pool(run.env_backend, RolloutWorker, args, cpus=1.0, max_restarts=MAX_RESTARTS,
                              name=f"pamarl-rollout-{os.getpid()}-{id(self)}")
        self.restarts = 0
        """Worker restarts in this process so far (each one's env copies get seeds never used before)."""
        self._logged = 0
        self._seed = 0

    def reset(self, seed: int) -> None:
        self._seed = seed
        futs = [self.pool.submit(w, "reset", seed) for w in range(self.pool.n)]
        for w, f in enumerate(futs):
            self._answer(w, f, "reset", seed)

    def _revive(self, w: int) -> None:
        """Worker ``w`` died: wait for Ray's restart and reset its copies with seeds derived from the last reset's."""
        self.restarts += 1
        wait = getattr(self.pool, "wait_alive", None)
        if wait is not None:
            wait(w)
        self.pool.result(self.pool.submit(w, "reset", self._seed + 7_919 * self.restarts))

    def _answer(self, w: int, future: Any, method: str, *args: Any) -> Any:
        """Worker ``w``'s answer to ``future`` (a call of ``method(*args)``); while the worker dies, revive it (its
        copies are reset on the way, which is all a ``reset`` asks) and ask again, at most :data:`MAX_RESTARTS`
        times."""
        last: WorkerDied | None = None
        for attempt in range(MAX_RESTARTS + 1):
            try:
                if attempt > 0:
                    self._revive(w)
                    if method == "reset":
                        return None
                    future = self.pool.submit(w, method, *args)
                return self.pool.result(future)
            except WorkerDied as e:
                last = e
        raise TrainingError(f"rollout worker {w} died {MAX_RESTARTS + 1} times during one {method} ({last}); "
                            "resume the run once the cluster is healthy")

    def collect(self, algo: Algorithm, iteration: int, shape: Shape) -> Collected:
        policy = self.pool.put(acting_state(algo))  # the weights, broadcast once per iteration
        futs = [self.pool.submit(w, "collect", policy, iteration) for w in range(self.pool.n)]
        parts = [self._answer(w, f, "collect", policy, iteration) for w, f in enumerate(futs)]
        restarts, self._logged = self.restarts - self._logged, self.restarts  # since the last iteration's log
        cat = lambda xs: torch.cat(xs, dim=1)  # noqa: E731 - [T, E_w, ...] shares -> [T, E, ...]
        obs = {k: cat([p["obs"][k] for p in parts]) for k in _OBS}
        final = {k: cat([p["final"][k] for p in parts]) for k in _OBS}
        out = {k: None if parts[0]["out"][k] is None else cat([p["out"][k] for p in parts]) for k in _OUT}
        reward, term, trunc = (cat([p[k] for p in parts]) for k in ("reward", "terminated", "truncated"))
        cost = None if parts[0]["cost"] is None else cat([p["cost"] for p in parts])
        got = Collected(metrics={"rollout/restarts": float(restarts)})
        for t in range(self.rollout_len):
            o = BatchObs(**{k: obs[k][t] for k in _OBS})
            opt = {k: None if v is None else v[t] for k, v in out.items()}
            a = ActOut(env_action=_required(opt, "env_action"), action=_required(opt, "action"), logp=opt["logp"])
            episodes = [e for p in parts for e in p["episodes"][t]]
            st = BatchStep(next=BatchObs(**{k: obs[k][t + 1] for k in _OBS}),
                           final=BatchObs(**{k: final[k][t] for k in _OBS}), reward=reward[t],
                           cost=None if cost is None else cost[t], terminated=term[t], truncated=trunc[t],
                           episodes=episodes)
            lp = step_logp(a, o, self.spec.n_agents)
            if lp is not None:
                got.logps.append(lp)
            algo.observe(o, a, shape(st))
            got.episodes.extend(episodes)
        return got

    def pids(self) -> list[int]:
        """The workers' process ids (tests SIGKILL one)."""
        return [int(p) for p in self.pool.call_all("pid")]

    def close(self) -> None:
        self.pool.close()
