"""How the runner gets one iteration's experience: the collection hook of :func:`pamarl.runner.train`.

A :class:`Collector` owns the training env copies, resets them when the runner says (at the start and at
every periodic checkpoint, for exact resume) and, once per iteration, fills the algorithm with
``rollout_len`` steps of every copy through the algorithm's own :meth:`~pamarl.algos.base.Algorithm.observe`.
It returns what the runner logs about the iteration (finished episodes, the log-probabilities for the
coordination metric, and metrics of its own).

* :class:`EnvCollector` (``rollout_workers=0``, the default): the learner acts on a batched env step by step
  (in-process copies, ``env_workers`` subprocesses or Ray env actors).
* :class:`pamarl.distributed.rollout.RolloutCollector` (``rollout_workers=W``, on-policy algorithms): ``W``
  workers, each holding a share of the env copies and a copy of the acting policy, collect their whole part of
  the rollout and send it back in one message.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from pamarl.envs.base import BatchedEnv, BatchObs, BatchStep, EnvSpec, EpisodeStats

if TYPE_CHECKING:
    from pamarl.algos.base import ActOut, Algorithm
    from pamarl.config import TrainConfig

Shape = Callable[[BatchStep], BatchStep]
"""What the learner sees of a step (the runner's reward convention, :func:`pamarl.runner.apply_reward_convention`)."""


@dataclass
class Collected:
    """What one iteration's collection reports to the runner."""

    episodes: list[EpisodeStats] = field(default_factory=list)
    """Episodes that finished during the iteration, in step order (copies in index order within a step)."""
    logps: list[torch.Tensor] = field(default_factory=list)
    """Per step, ``[E, N]`` log-probabilities of the sampled actions, NaN for agents not acting."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The collector's own numbers for the metrics row."""


class Collector(ABC):
    """``num_envs`` training env copies and the way the learner's experience is drawn from them."""

    spec: EnvSpec
    num_envs: int
    env: BatchedEnv | None = None
    """The batched env the learner acts on, if it has one in this process (self-play envs attach to it)."""

    @abstractmethod
    def reset(self, seed: int) -> None:
        """Reset every copy; copy ``i`` is seeded with ``seed + i``."""

    @abstractmethod
    def collect(self, algo: Algorithm, iteration: int, shape: Shape) -> Collected:
        """Fill ``algo`` with ``rollout_len`` steps of every copy (``iteration`` counts from 0)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the env copies and any workers."""


def step_logp(out: ActOut, obs: BatchObs, n_agents: int) -> torch.Tensor | None:
    """``[E, N]`` log-probabilities of ``out`` with NaN for agents that are not acting (dead, padded), which
    the coordination metric leaves out; None when the algorithm reports none or there is one agent."""
    if n_agents <= 1 or out.logp is None:
        return None
    lp = out.logp.reshape(-1, n_agents).float()
    return torch.where(obs.active.reshape(-1, n_agents).to(lp.device), lp, torch.nan)


class EnvCollector(Collector):
    """The learner acts on ``env`` one step at a time and observes each step (every algorithm)."""

    def __init__(self, env: BatchedEnv, rollout_len: int):
        self.env = env
        self.spec = env.spec
        self.num_envs = env.num_envs
        self.rollout_len = rollout_len
        self.obs: BatchObs | None = None

    def reset(self, seed: int) -> None:
        assert self.env is not None
        self.obs = self.env.reset(seed=seed)

    def collect(self, algo: Algorithm, iteration: int, shape: Shape) -> Collected:
        assert self.env is not None and self.obs is not None, "reset() before collect()"
        got = Collected()
        obs = self.obs
        ended = []  # read after the rollout: a batched GPU env's episodes are device tensors until then
        for _ in range(self.rollout_len):
            out = algo.act(obs, explore=True)
            lp = step_logp(out, obs, self.spec.n_agents)
            if lp is not None:
                got.logps.append(lp)
            st = self.env.step(out.env_action)
            algo.observe(obs, out, shape(st))
            if len(st.episodes):
                ended.append(st.episodes)
            obs = st.next
        self.obs = obs
        for episodes in ended:
            got.episodes.extend(episodes)
        return got

    def close(self) -> None:
        assert self.env is not None
        self.env.close()


def make_collector(run: TrainConfig, algo_cfg: Any) -> Collector:
    """The run's collector: rollout workers with ``rollout_workers > 0``, else the learner on a batched env."""
    if run.rollout_workers > 0:
        from pamarl.distributed.rollout import RolloutCollector

        return RolloutCollector(run, algo_cfg)
    from pamarl.envs.guard import build_env

    env = build_env(run.env, num_envs=run.num_envs, workers=run.env_workers, seed=run.seed, device=run.device,
                    backend=run.env_backend, inline=run.env_inline)
    return EnvCollector(env, run.rollout_len)
