"""DQN with parameter averaging: N independent-DQN learners, averaged every ``sync_every`` gradient steps.

Seed 003 (distributed DQN for multi-agent RL, sections 3-4): learner ``i`` has its own env copies, replay
``D_i``, per-agent Q-networks ``Q_i(o, a; theta_i)`` and target networks ``theta_i^-``, all starting from
the same ``theta_0``; each minimises the double-DQN loss of :class:`pamarl.algos.iql.IQL` on its own data
with its own epsilon, and every ``sync_every`` gradient steps the parameters are averaged (seed eq. in 3.2
step 4 and 4.2)::

    theta <- (1/N) sum_i theta_i        theta^- <- (1/N) sum_i theta_i^-

and loaded by every learner. Adam's moment estimates are averaged the same way (``opt_state=average``,
the default: a learner's next steps then follow the pooled gradient statistics) or cleared
(``opt_state=reset``).

How it fits the one runner: the algorithm owns its learners. Learner 0 lives in this process and acts
on the runner's env (so ``steps`` and the runner's logs count learner 0's env steps: the run's total is
``n_learners x steps``, logged as ``train/env_steps_total``); learners 1..N-1 are workers of a
:mod:`pamarl.distributed.pool` (``backend=local``: in this process, one after the other; ``backend=ray``:
Ray actors, in parallel with learner 0) that each collect one iteration (``rollout_len x num_envs`` steps)
on their own env copies and train on it while the runner collects learner 0's. Averaging happens at the
end of an iteration, the first at which learner 0 has done another ``sync_every`` gradient steps (choose
``rollout_len x num_envs / env_steps_per_update`` to divide ``sync_every`` for exact intervals).

* ``sync_mode=sync``: wait for every learner, then average (deterministic: the same numbers on both
  backends, and exact resume, since every learner's replay, optimiser, counters and RNG are checkpointed).
* ``sync_mode=async``: average learner 0 with whichever learners have reported; a learner still running is
  waited for only when it has missed ``max_staleness`` averages (its parameters then started from an
  average that old). Timing decides who joins, so runs are not bit-reproducible.

Logged per iteration: ``avg/divergence`` (mean over learners of ``||theta_i - theta_bar|| / ||theta_bar||`` of
the online networks just before an average), ``avg/return_l<i>`` (each learner's mean training episode return),
``time/sync_s`` and ``time/sync_share`` (time after learner 0's own update spent waiting for the others, averaging
and loading the average, and its share of the iteration), ``avg/averages``, ``avg/learners_averaged``,
``avg/staleness_max`` (async), ``avg/restarts`` and ``train/env_steps_total``.

A learner whose Ray actor dies (process or node) is restarted by Ray; it reloads its state from the last
checkpoint and the current averaged parameters, then redoes its iteration (``avg/restarts`` counts them;
learner 0's env steps, the run's budget, are unaffected).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pamarl.algos.base import ActOut, Algorithm, Metrics, Progress
from pamarl.algos.iql import IQL
from pamarl.algos.registry import register
from pamarl.algos.value_based import ValueConfig
from pamarl.config import TrainConfig
from pamarl.distributed.pool import WorkerDied, WorkerPool, WorkerRestarted, make_pool
from pamarl.envs.base import BatchObs, BatchStep, EnvSpec
from pamarl.errors import UsageError

Params = dict[str, Any]
"""``{"nets": {name: state_dict}, "opt": Adam state_dict}`` of one learner."""


@dataclass
class DQNAvgConfig(ValueConfig):
    """The IQL learner's hyperparameters plus the averaging scheme."""

    n_learners: int = 2
    """Number of learners N, each with its own num_envs env copies and replay."""
    sync_every: int = 100
    """Average the learners' online and target parameters every this many gradient steps (of learner 0)."""
    sync_mode: str = "sync"
    """sync: wait for every learner before averaging; async: average whoever has reported."""
    max_staleness: int = 2
    """async: a learner that has missed this many averages is waited for."""
    opt_state: str = "average"
    """Adam moments at an average: 'average' them like the parameters, or 'reset' them."""
    learner_eps: tuple[float, ...] = ()
    """Final epsilon of each learner (N values; empty: eps_finish for all)."""
    backend: str = "local"
    """Where learners 1..N-1 run: local (this process), ray (Ray actors), auto (ray when installed)."""
    ray_address: str = ""
    """Ray cluster to join with backend=ray (auto or HOST:PORT; empty: start a local one)."""
    cpus_per_learner: float = 1.0
    """CPUs Ray reserves for each learner actor."""
    max_restarts: int = 3
    """Times Ray restarts a learner whose process or node died."""

    def validate(self) -> None:
        super().validate()
        if self.n_learners < 1 or self.sync_every < 1 or self.max_staleness < 1:
            raise UsageError("n_learners, sync_every and max_staleness must be >= 1")
        if self.sync_mode not in ("sync", "async"):
            raise UsageError(f"sync_mode must be 'sync' or 'async', got {self.sync_mode!r}")
        if self.opt_state not in ("average", "reset"):
            raise UsageError(f"opt_state must be 'average' or 'reset', got {self.opt_state!r}")
        if self.learner_eps and len(self.learner_eps) != self.n_learners:
            raise UsageError(f"learner_eps needs one value per learner ({self.n_learners}), "
                             f"got {len(self.learner_eps)}")
        if self.backend not in ("local", "ray", "auto"):
            raise UsageError(f"backend must be local, ray or auto, got {self.backend!r}")


def learner_seed(seed: int, index: int, iteration: int = 0) -> int:
    """Seed of learner ``index``'s sampling (iteration 0) or env reset at ``iteration``."""
    return (seed * 1_000_003 + index * 7_919 + iteration * 9_973 + 17) % (2**31 - 1)


# ---------------------------------------------------------------------- parameter averaging (pure)
def average_params(params: list[Params], opt_state: str) -> Params:
    """theta = (1/N) sum_i theta_i for every floating tensor of the networks (and of Adam's state)."""
    nets = {k: _mean_dicts([p["nets"][k] for p in params]) for k in params[0]["nets"]}
    out: Params = {"nets": nets}
    if opt_state == "average":
        opts = [p["opt"] for p in params]
        if all(o["state"] for o in opts):
            state = {k: _mean_dicts([o["state"][k] for o in opts]) for k in opts[0]["state"]}
            out["opt"] = {"state": state, "param_groups": opts[0]["param_groups"]}
    return out


def _mean_dicts(ds: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for k, v in ds[0].items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            out[k] = torch.stack([d[k] for d in ds]).mean(0)
        else:
            out[k] = v
    return out


def divergence(params: list[Params], avg: Params, net: str = "qnet") -> float:
    """Mean over learners of ``||theta_i - theta_bar|| / ||theta_bar||`` (online network), before averaging."""
    def flat(sd: dict[str, Any]) -> torch.Tensor:
        return torch.cat([v.reshape(-1).float() for v in sd.values() if isinstance(v, torch.Tensor)
                          and v.is_floating_point()])

    bar = flat(avg["nets"][net])
    norm = float(bar.norm().clamp_min(1e-12))
    return float(np.mean([float((flat(p["nets"][net]) - bar).norm()) / norm for p in params]))


# ---------------------------------------------------------------------- one learner
class Learner:
    """An IQL learner with its own env copies (``env=True``), in this process or inside a Ray actor."""

    def __init__(self, index: int, spec: EnvSpec, cfg: ValueConfig, run: TrainConfig, env: bool = True):
        torch.set_num_threads(max(1, run.torch_threads))
        self.index, self.run = index, run
        self.algo = IQL(spec, cfg, run, torch.device(run.device))
        self.env = None
        self.obs: BatchObs | None = None
        self.loaded = not env  # a worker learner works only once the driver has given it parameters or a state
        if env:
            from pamarl.envs.registry import make_env

            self.env = make_env(run.env, num_envs=run.num_envs, seed=run.seed, device=run.device)
            self.reset_env(0)

    def pid(self) -> int:
        return os.getpid()

    def reset_env(self, iteration: int) -> None:
        assert self.env is not None
        self.obs = self.env.reset(seed=learner_seed(self.run.seed, self.index, iteration))
        self.algo.reset_rollout()

    def iterate(self, progress: Progress) -> dict[str, Any]:
        """Collect one iteration on the own env copies, then the gradient steps due for it."""
        if not self.loaded:
            raise WorkerRestarted(f"learner {self.index} has no parameters yet (restarted after a death)")
        assert self.env is not None and self.obs is not None
        t0 = time.perf_counter()
        from pamarl.runner import apply_reward_convention

        returns: list[float] = []
        for _ in range(self.run.rollout_len):
            out = self.algo.act(self.obs, explore=True)
            st = self.env.step(out.env_action)
            # The runner's reward convention, exactly as learner 0 gets it from the runner.
            self.algo.observe(self.obs, out, apply_reward_convention(st, self.algo.reward_mode))
            returns.extend(e.team_return for e in st.episodes)
            self.obs = st.next
        metrics = self.algo.update(progress)
        return {"index": self.index, "returns": returns, "metrics": metrics, "updates": self.algo.updates,
                "env_steps": self.run.rollout_len * self.run.num_envs, "busy_s": time.perf_counter() - t0,
                "params": self.params()}

    def params(self) -> Params:
        return {"nets": {k: self.algo.nets[k].state_dict() for k in ("qnet", "target_qnet")},
                "opt": self.algo.opts["q"].state_dict()}

    def load_params(self, p: Params) -> None:
        self.loaded = True
        for k, sd in p["nets"].items():
            self.algo.nets[k].load_state_dict(sd)
        opt = self.algo.opts["q"]
        if "opt" in p:
            # A copy: Adam keeps the given tensors as its state and updates them in place, so learners in one
            # process would otherwise share their moment estimates.
            opt.load_state_dict(copy.deepcopy(p["opt"]))
        else:
            opt.state.clear()  # opt_state=reset: Adam starts its moment estimates again

    def state_dict(self) -> dict[str, Any]:
        return self.algo.state_dict()

    def load_state_dict(self, state: dict[str, Any], iteration: int) -> None:
        self.loaded = True
        self.algo.load_state_dict(state)
        if self.env is not None:
            self.reset_env(iteration)

    def close(self) -> None:
        if self.env is not None:
            self.env.close()


# ---------------------------------------------------------------------- the algorithm
@register
class DQNAvg(Algorithm):
    """N IQL learners whose parameters are averaged every ``sync_every`` gradient steps (seed 003)."""

    name = "dqn_avg"
    Config = DQNAvgConfig
    action_kinds = ("discrete",)
    supports_recurrent = IQL.supports_recurrent
    paper = "seed 003: distributed DQN for multi-agent RL with parameter averaging (Ray)"
    cfg: DQNAvgConfig

    def __init__(self, spec: EnvSpec, cfg: DQNAvgConfig, run: TrainConfig, device: torch.device):
        super().__init__(spec, cfg, run, device)
        cfg.validate()  # a config built by hand is checked too
        self.n = cfg.n_learners
        base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ValueConfig)}
        eps = cfg.learner_eps or (cfg.eps_finish,) * self.n
        self.learner_cfgs = [ValueConfig(**{**base, "eps_finish": float(e)}) for e in eps]
        self.learner_runs = [run] + [dataclasses.replace(run, seed=learner_seed(run.seed, i)) for i in range(1, self.n)]
        self.local = Learner(0, spec, self.learner_cfgs[0], run, env=False)
        theta0 = self.local.params()
        self.pool: WorkerPool | None = None
        if self.n > 1:
            args = [(i, spec, self.learner_cfgs[i], self.learner_runs[i]) for i in range(1, self.n)]
            self.pool = make_pool(cfg.backend, Learner, args, cpus=cfg.cpus_per_learner, max_restarts=cfg.max_restarts,
                                  address=cfg.ray_address or None,
                                  name=f"pamarl-learner-{os.getpid()}-{id(self)}" if cfg.backend != "local" else None)
            self.pool.call_all("load_params", [(theta0,)] * (self.n - 1))  # theta_i = theta_0 for every learner
        self.iteration = 0
        self.averages = 0
        self.last_avg_updates = 0
        self.restarts = 0
        self.env_steps_total = 0
        self.inflight: dict[int, Any] = {}  # worker index (0-based in the pool) -> future
        self.reported: dict[int, dict[str, Any]] = {}
        self.staleness = [0] * (self.n - 1)
        self.saved: list[dict[str, Any] | None] = [None] * (self.n - 1)
        self.local_returns: list[float] = []
        self._t_last = time.perf_counter()

    # ------------------------------------------------------------------ acting (learner 0)
    def act(self, obs: BatchObs, explore: bool = True) -> ActOut:
        return self.local.algo.act(obs, explore)

    @contextmanager
    def evaluation(self) -> Iterator[None]:
        with super().evaluation(), self.local.algo.evaluation():
            yield

    def observe(self, obs: BatchObs, out: ActOut, step: BatchStep) -> None:
        if self.pool is not None:
            self._dispatch()  # the other learners collect their iteration while the runner collects learner 0's
        self.local.algo.observe(obs, out, step)
        self.local_returns.extend(e.team_return for e in step.episodes)

    def _dispatch(self) -> None:
        assert self.pool is not None
        for w in range(self.n - 1):
            if w not in self.inflight and w not in self.reported:
                self.inflight[w] = self.pool.submit(w, "iterate", self._progress)

    @property
    def _progress(self) -> Progress:
        return Progress(iteration=self.iteration, total_iterations=0, env_steps=self.local.algo.env_steps)

    # ------------------------------------------------------------------ workers
    def _collect(self, block: set[int]) -> None:
        """Move finished iterations from in flight to reported; wait for the workers in ``block``."""
        assert self.pool is not None
        while self.inflight:
            futs = list(self.inflight.values())
            done = self.pool.ready(futs, timeout=0.0)
            if not done and not (block & set(self.inflight)):
                return
            if not done:
                done = self.pool.ready(futs, timeout=None)
            for w, f in list(self.inflight.items()):
                if f in done:
                    del self.inflight[w]
                    try:
                        self.reported[w] = self.pool.result(f)
                    except WorkerDied:
                        self._recover(w)

    def _restore(self, w: int) -> None:
        """Learner ``w``'s actor died: wait for Ray's restart, reload its last checkpointed state (or reset
        it) and the current parameters of learner 0 (the last average plus learner 0's steps since)."""
        assert self.pool is not None
        self.restarts += 1
        wait = getattr(self.pool, "wait_alive", None)
        if wait is not None:
            wait(w)
        if self.saved[w] is not None:
            self.pool.result(self.pool.submit(w, "load_state_dict", self.saved[w], self.iteration))
        else:
            self.pool.result(self.pool.submit(w, "reset_env", self.iteration))
        p = self.local.params()
        if self.cfg.opt_state == "reset":
            p.pop("opt")
        self.pool.result(self.pool.submit(w, "load_params", p))

    def _recover(self, w: int) -> None:
        """Restore a dead learner and redo its iteration."""
        assert self.pool is not None
        self._restore(w)
        self.inflight[w] = self.pool.submit(w, "iterate", self._progress)

    def _call_all(self, method: str, args: list[tuple[Any, ...]] | None = None) -> list[Any]:
        """``method`` on every worker learner in parallel; a learner that died is restored and asked again."""
        assert self.pool is not None
        futs = [self.pool.submit(w, method, *(args[w] if args else ())) for w in range(self.n - 1)]
        out = []
        for w, f in enumerate(futs):
            try:
                out.append(self.pool.result(f))
            except WorkerDied:
                self._restore(w)
                out.append(self.pool.result(self.pool.submit(w, method, *(args[w] if args else ()))))
        return out

    # ------------------------------------------------------------------ update
    def update(self, progress: Progress) -> Metrics:
        self.iteration = progress.iteration + 1
        metrics = dict(self.local.algo.update(progress))
        self.env_steps_total += self.run.rollout_len * self.run.num_envs
        metrics["avg/return_l0"] = float(np.mean(self.local_returns)) if self.local_returns else float("nan")
        self.local_returns = []
        t0 = time.perf_counter()
        if self.pool is not None:
            sync = self.cfg.sync_mode == "sync"
            late = {w for w in range(self.n - 1) if self.staleness[w] + 1 >= self.cfg.max_staleness}
            self._collect(set(range(self.n - 1)) if sync else late)
            for w, r in self.reported.items():
                self.env_steps_total += r["env_steps"]
                if r["returns"]:
                    metrics[f"avg/return_l{w + 1}"] = float(np.mean(r["returns"]))
        # async: an average of learner 0 alone would be no average; it waits until another learner reports.
        due = (self.local.algo.updates - self.last_avg_updates >= self.cfg.sync_every and self.n > 1
               and bool(self.reported))
        if due:
            metrics.update(self._average())
        if self.pool is not None:
            # Learners that reported start their next iteration at learner 0's next observe.
            for w in range(self.n - 1):
                self.staleness[w] = 0 if w in self.reported else self.staleness[w] + int(due)
            metrics["avg/staleness_max"] = float(max(self.staleness))
            self.reported = {}
        now = time.perf_counter()
        sync_s = now - t0  # waiting for the other learners, averaging, loading the average
        metrics.update({"avg/averages": float(self.averages), "avg/restarts": float(self.restarts),
                        "time/sync_s": sync_s, "time/sync_share": sync_s / max(now - self._t_last, 1e-9),
                        "train/env_steps_total": float(self.env_steps_total)})
        self._t_last = time.perf_counter()
        return metrics

    def _average(self) -> Metrics:
        params = [self.local.params()] + [r["params"] for r in self.reported.values()]
        avg = average_params(params, self.cfg.opt_state)
        div = divergence(params, avg)
        self.local.load_params(avg)
        if self.pool is not None:
            futs = {w: self.pool.submit(w, "load_params", avg) for w in self.reported}
            for w, f in futs.items():
                try:
                    self.pool.result(f)
                except WorkerDied:
                    self._restore(w)  # loads learner 0's parameters, which are now the average
        self.averages += 1
        self.last_avg_updates = self.local.algo.updates
        return {"avg/divergence": div, "avg/learners_averaged": float(len(params))}

    # ------------------------------------------------------------------ runner hooks and state
    def reset_rollout(self) -> None:
        self.local.algo.reset_rollout()
        if self.pool is not None:
            self._drain()
            self._call_all("reset_env", [(self.iteration,)] * (self.n - 1))

    def _drain(self) -> None:
        """async: finish every iteration in flight (its parameters join the next average)."""
        if self.pool is not None and self.inflight:
            self._collect(set(self.inflight))
            for r in self.reported.values():
                self.env_steps_total += r["env_steps"]
            self.reported = {}

    def state_dict(self) -> dict[str, Any]:
        remote: list[Any] = []
        if self.pool is not None:
            self._drain()
            remote = self._call_all("state_dict")
            self.saved = list(remote)
        return {"learners": [self.local.state_dict(), *remote], "rng": self._rng_state(),
                "counters": {"iteration": self.iteration, "averages": self.averages, "restarts": self.restarts,
                             "last_avg_updates": self.last_avg_updates, "env_steps_total": self.env_steps_total,
                             "staleness": list(self.staleness)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["learners"]) != self.n:
            raise ValueError(f"checkpoint has {len(state['learners'])} learners, the config {self.n}")
        c = state["counters"]
        self.iteration, self.averages, self.restarts = int(c["iteration"]), int(c["averages"]), int(c["restarts"])
        self.last_avg_updates, self.env_steps_total = int(c["last_avg_updates"]), int(c["env_steps_total"])
        self.staleness = [int(s) for s in c["staleness"]]
        self.local.algo.load_state_dict(state["learners"][0])
        if self.pool is not None:
            self.saved = list(state["learners"][1:])
            self._call_all("load_state_dict", [(s, self.iteration) for s in self.saved])
        self._load_rng_state(state["rng"])

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()  # Ray actors hold their CPUs until released
            self.pool = None
