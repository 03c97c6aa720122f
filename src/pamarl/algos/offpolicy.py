"""The off-policy family's template: replay, target networks, warmup, updates per iteration, exploration.

:class:`OffPolicyAlgorithm` stores every transition the runner shows it in a replay memory
(:mod:`pamarl.buffers.replay`) and, once ``learning_starts`` env steps are stored, runs a number of
gradient steps per runner iteration (one per ``env_steps_per_update`` env steps collected, or a fixed
``updates_per_iteration``), each on a fresh minibatch, followed by a soft (``tau``) or periodic hard
(``target_update_interval``) update of the target networks. Two bases build on it, each in its own module:

* :class:`pamarl.algos.value_based.ValueBasedAlgorithm` -- IQL, VDN, QMIX: per-agent utilities
  ``Q_i(o_i, .)`` (MLP or GRU), epsilon-greedy over allowed actions, double-Q targets, optionally a
  mixer ``Q_tot = f(Q, s)``;
* :class:`pamarl.algos.actor_critic.ActorCriticAlgorithm` -- MADDPG, HADDPG, HATD3: deterministic
  actors, centralised critics ``Q(s, a_1..a_N)``, Gaussian (continuous) or Gumbel (discrete)
  exploration, and the HA family's sequential actor update over :func:`pamarl.algos.schedules.sequential`.

Recommended runs: an iteration is ``rollout_len x num_envs`` env steps followed by the gradient steps
due for them, so a short ``rollout_len`` keeps the data fresh (``rollout_len=25`` is one MPE episode):
``pamarl train --algo qmix --env mpe/simple_spread_v3 rollout_len=25 steps=1000000``.

Checkpoints hold the replay (``checkpoint_replay=true``, the default), so that a resumed run continues
exactly as an uninterrupted one; with ``checkpoint_replay=false`` they hold only networks, optimisers,
counters and RNG, stay small, and a resumed run refills the replay for ``learning_starts`` steps
before learning again.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from pamarl.algos.base import ActOut, Algorithm, LearnerConfig, Metrics, Progress
from pamarl.algos.common import optimizer_step
from pamarl.buffers.replay import EpisodeBatch, EpisodeReplay, ReplayBuffer, TransitionBatch
from pamarl.config import TrainConfig
from pamarl.envs.base import BatchObs, BatchStep, EnvSpec
from pamarl.errors import UsageError
from pamarl.nets.qnets import masked_logits


# ====================================================================== configuration
@dataclass
class OffPolicyConfig(LearnerConfig):
    """Hyperparameters shared by the off-policy family."""

    n_step: int = 1
    """Multi-step returns: sum up to n rewards of the same env copy (stopping at episode ends) before
    bootstrapping (single-step transitions only, not with rnn=true)."""
    batch_size: int = 256
    """Transitions per gradient step."""
    buffer_size: int = 100_000
    """Replay capacity in env steps (one env copy's step of every agent)."""
    learning_starts: int = 2_000
    """Env steps stored before the first gradient step."""
    env_steps_per_update: float = 8.0
    """One gradient step per this many env steps collected (E copies stepping once count E)."""
    updates_per_iteration: int = 0
    """Gradient steps per runner iteration; 0 derives them from env_steps_per_update."""
    tau: float = 0.005
    """Soft target update theta' <- tau * theta + (1 - tau) * theta' after every gradient step."""
    target_update_interval: int = 0
    """Copy the networks into the targets every this many gradient steps instead (0: soft updates)."""
    hidden: tuple[int, ...] = (64, 64)
    """Hidden layer sizes of the agent networks and critics."""
    agent_id: bool = True
    """With share_params, append a one-hot agent id to the agent networks' inputs."""
    checkpoint_replay: bool = True
    """Save the replay in checkpoints (exact resume; checkpoints grow with the replay)."""

    def validate(self) -> None:
        if not 0.0 <= self.gamma <= 1.0:
            raise UsageError(f"gamma must lie in [0, 1], got {self.gamma}")
        if not 0.0 < self.tau <= 1.0:
            raise UsageError(f"tau must lie in (0, 1], got {self.tau}")
        if self.batch_size < 1 or self.buffer_size < 1:
            raise UsageError("batch_size and buffer_size must be >= 1")
        if self.env_steps_per_update <= 0 or self.updates_per_iteration < 0 or self.target_update_interval < 0:
            raise UsageError("env_steps_per_update must be > 0; updates_per_iteration, target_update_interval >= 0")
        if self.n_step < 1:
            raise UsageError(f"n_step must be >= 1, got {self.n_step}")



# ====================================================================== pure functions
def td_target(reward: torch.Tensor, terminated: torch.Tensor, next_value: torch.Tensor,
              discount: float | torch.Tensor) -> torch.Tensor:
    """TD target ``y = r + discount * (1 - terminated) * V(s')``.

    ``s'`` is the true successor (the ``final`` observation), so a truncated episode bootstraps and a
    terminated one does not. ``discount`` is ``gamma``, or per sample ``gamma^m`` for an m-step return
    ``r`` (then ``s'`` and ``terminated`` belong to the m-th step). ``terminated`` and a per-sample
    ``discount`` broadcast from the left over trailing agent dims.
    """
    g = discount * (1.0 - terminated.to(reward.dtype))
    while g.dim() < reward.dim():
        g = g.unsqueeze(-1)
    return reward + g * next_value


def masked_argmax(q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Greedy action among the allowed ones: ``[..., A] -> [...]`` long."""
    return masked_logits(q, mask).argmax(-1)


def double_q_value(q_online_next: torch.Tensor, q_target_next: torch.Tensor, next_mask: torch.Tensor) -> torch.Tensor:
    """Double DQN (van Hasselt et al. 2016, eq. 4): ``Q_target(o', argmax_a Q_online(o', a))`` over allowed actions."""
    a = masked_argmax(q_online_next, next_mask)
    return q_target_next.gather(-1, a.unsqueeze(-1)).squeeze(-1)


def max_q_value(q_target_next: torch.Tensor, next_mask: torch.Tensor) -> torch.Tensor:
    """DQN target value ``max_a Q_target(o', a)`` over allowed actions."""
    return masked_logits(q_target_next, next_mask).max(-1).values


def linear_schedule(start: float, finish: float, steps: int, t: int) -> float:
    """``start`` moving linearly to ``finish`` over ``steps``, then constant."""
    if steps <= 0:
        return finish
    return start + (finish - start) * min(1.0, t / steps)


def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """Polyak averaging ``theta' <- tau * theta + (1 - tau) * theta'`` (DDPG, Lillicrap et al. 2016)."""
    with torch.no_grad():
        tp: list[torch.Tensor] = list(target.parameters())
        if tp:  # a parameter-free module (VDN's sum) has nothing to average
            sp: list[torch.Tensor] = list(source.parameters())
            torch._foreach_lerp_(tp, sp, tau)


def hard_update(target: nn.Module, source: nn.Module) -> None:
    target.load_state_dict(source.state_dict())


M = TypeVar("M", bound=nn.Module)


def frozen_copy(module: M) -> M:
    """A target network: a copy that never receives gradients."""
    t = copy.deepcopy(module)
    for p in t.parameters():
        p.requires_grad_(False)
    return t


# ====================================================================== template
class OffPolicyAlgorithm(Algorithm):
    """Replay, target networks, warmup, gradient steps per iteration, checkpoints.

    Subclasses build their networks in :meth:`build` and register them in ``self.nets`` (saved) and
    ``self.targets`` (pairs ``(online, target)`` kept in sync), their optimisers in ``self.opts``, and
    implement :meth:`act` and :meth:`train_step` (one gradient step on one minibatch).
    """

    Config = OffPolicyConfig
    sync_every_step: bool = True
    """Update the targets after every gradient step (HATD3 syncs only with its delayed actor update)."""

    def __init__(self, spec: EnvSpec, cfg: OffPolicyConfig, run: TrainConfig, device: torch.device):
        super().__init__(spec, cfg, run, device)
        self.n = spec.n_agents
        self.num_envs = run.num_envs
        self.nets: dict[str, nn.Module] = {}
        self.targets: list[tuple[nn.Module, nn.Module]] = []
        self.opts: dict[str, torch.optim.Optimizer] = {}
        self.build()
        self.replay: ReplayBuffer | EpisodeReplay = self.make_replay()
        self.env_steps = 0
        """Env steps observed over the whole run (drives exploration schedules)."""
        self.replay_steps = 0
        """Env steps stored in the replay since it was (re)filled (drives learning_starts)."""
        self.updates = 0
        self.syncs = 0
        self._pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # (targets, online), sync_targets
        self._due = 0.0  # gradient steps owed to the env steps collected since the last update

    # ------------------------------------------------------------------ to implement
    def build(self) -> None:
        raise NotImplementedError

    def train_step(self, batch: Any) -> dict[str, torch.Tensor]:
        """One gradient step on ``batch``; returns detached scalars to average over the iteration."""
        raise NotImplementedError

    def explore_metrics(self) -> Metrics:
        return {}

    # ------------------------------------------------------------------ replay
    @property
    def recurrent(self) -> bool:
        """Whether this run's agents are recurrent (only learners declaring ``supports_recurrent`` can be)."""
        return False

    def max_seq_len(self) -> int:
        return int(self.spec.episode_limit or 100)

    def make_replay(self) -> ReplayBuffer | EpisodeReplay:
        if self.recurrent:
            L = self.max_seq_len()
            return EpisodeReplay(self.spec, max(1, math.ceil(self.cfg.buffer_size / L)), L, self.num_envs, self.device)
        return ReplayBuffer(self.spec, max(self.cfg.buffer_size, self.num_envs), self.device)

    def sample(self, batch_size: int) -> TransitionBatch | EpisodeBatch:
        if isinstance(self.replay, ReplayBuffer):
            return self.replay.sample(batch_size, self.generator, self.cfg.n_step, self.cfg.gamma)
        return self.replay.sample(batch_size, self.generator)

    def batch_size(self) -> int:
        return self.cfg.batch_size

    def observe(self, obs: BatchObs, out: ActOut, step: BatchStep) -> None:
        self.replay.add(obs, out.action, step)
        e = obs.obs.shape[0]
        self.env_steps += e
        self.replay_steps += e
        if self.learning():
            self._due += e / self.cfg.env_steps_per_update
        self.after_observe(step)

    def after_observe(self, step: BatchStep) -> None:  # noqa: B027 - optional hook
        """Per-step bookkeeping of subclasses (e.g. resetting recurrent states of finished episodes)."""

    def reset_rollout(self) -> None:
        """The runner resets the envs: cut running episodes (they bootstrap like a truncation)."""
        if isinstance(self.replay, EpisodeReplay):
            self.replay.flush()
        else:
            self.replay.cut()

    def learning(self) -> bool:
        return self.replay_steps >= max(1, self.cfg.learning_starts) and len(self.replay) > 0

    # ------------------------------------------------------------------ targets
    def sync_targets(self) -> None:
        """Soft update every target, or a hard copy every ``target_update_interval`` calls."""
        self.syncs += 1
        k = self.cfg.target_update_interval
        if k > 0:
            if self.syncs % k == 0:
                for online, target in self.targets:
                    hard_update(target, online)
            return
        if self._pairs is None:  # every pair in one call; the lists are built once (modules never change)
            self._pairs = ([p for _, t in self.targets for p in t.parameters()],
                           [p for o, _ in self.targets for p in o.parameters()])
        if self._pairs[0]:  # VDN's parameter-free mixer alone has nothing to average
            with torch.no_grad():  # Polyak averaging, as soft_update
                torch._foreach_lerp_(self._pairs[0], self._pairs[1], self.cfg.tau)

    # ------------------------------------------------------------------ update
    def updates_due(self) -> int:
        if self.cfg.updates_per_iteration > 0:
            self._due = 0.0
            return self.cfg.updates_per_iteration if self.learning() else 0
        n = int(self._due + 1e-9)
        self._due -= n
        return n

    def update(self, progress: Progress) -> Metrics:
        n = self.updates_due()
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        bs = self.batch_size()
        for _ in range(n):
            batch = self.sample(bs)
            m = self.train_step(batch)
            self.updates += 1
            if self.sync_every_step:
                self.sync_targets()
            for k, v in m.items():  # keys may be missing on some steps (HATD3's delayed actor)
                sums[k] = sums[k] + v if k in sums else v
                counts[k] = counts.get(k, 0) + 1
        metrics: Metrics = {"train/buffer_size": float(len(self.replay)), "train/updates": float(self.updates)}
        metrics.update(self.explore_metrics())
        for k, v in sums.items():
            metrics[k] = float(v) / counts[k]
        return metrics

    def step_optimizer(self, opt: torch.optim.Optimizer, loss: torch.Tensor, params: list[nn.Parameter],
                       what: str, backward: Callable[[], object] | None = None) -> torch.Tensor:
        """Backward (or ``backward()``), clip and step (:func:`pamarl.algos.common.optimizer_step`); returns
        the gradient norm."""
        return optimizer_step(opt, loss, params, self.cfg.max_grad_norm, what, backward)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "nets": {k: m.state_dict() for k, m in self.nets.items()},
            "opts": {k: o.state_dict() for k, o in self.opts.items()},
            "replay": self.replay.state_dict() if self.cfg.checkpoint_replay else None,
            "counters": {"env_steps": self.env_steps, "replay_steps": self.replay_steps, "updates": self.updates,
                         "syncs": self.syncs, "due": self._due},
            "rng": self._rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, m in self.nets.items():
            m.load_state_dict(state["nets"][k])
        for k, o in self.opts.items():
            o.load_state_dict(state["opts"][k])
        c = state["counters"]
        self.env_steps, self.updates, self.syncs = int(c["env_steps"]), int(c["updates"]), int(c["syncs"])
        if state.get("replay") is not None:
            self.replay.load_state_dict(state["replay"])
            self.replay_steps, self._due = int(c["replay_steps"]), float(c["due"])
        else:  # the replay was not saved: refill it before learning again
            self.replay = self.make_replay()
            self.replay_steps, self._due = 0, 0.0
        self._load_rng_state(state["rng"])
        # The runner always resets the envs after loading; do what it does after a checkpoint, so that a
        # resumed run and an uninterrupted one continue from the same state.
        self.reset_rollout()
