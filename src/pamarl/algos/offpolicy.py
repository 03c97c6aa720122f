"""The off-policy family's template: replay, target networks, warmup, updates per iteration, exploration.

:class:`OffPolicyAlgorithm` stores every transition the runner shows it in a replay memory
(:mod:`pamarl.buffers.replay`) and, once ``learning_starts`` env steps are stored, runs a number of
gradient steps per runner iteration (one per ``env_steps_per_update`` env steps collected, or a fixed
``updates_per_iteration``), each on a fresh minibatch, followed by a soft (``tau``) or periodic hard
(``target_update_interval``) update of the target networks. Two bases build on it:

* :class:`ValueBasedAlgorithm` -- IQL, VDN, QMIX: per-agent utilities ``Q_i(o_i, .)`` (MLP or GRU),
  epsilon-greedy over allowed actions, double-Q targets, optionally a mixer ``Q_tot = f(Q, s)``;
* :class:`ActorCriticAlgorithm` -- MADDPG, HADDPG, HATD3: deterministic actors, centralised critics
  ``Q(s, a_1..a_N)``, Gaussian (continuous) or Gumbel (discrete) exploration, and the HA family's
  sequential actor update over :func:`pamarl.algos.schedules.sequential`.

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
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
from torch import nn

from pamarl.algos.base import ActOut, Algorithm, LearnerConfig, Metrics, Progress
from pamarl.algos.schedules import sequential
from pamarl.buffers.replay import EpisodeBatch, EpisodeReplay, ReplayBuffer, TransitionBatch
from pamarl.config import TrainConfig
from pamarl.envs.base import BatchObs, BatchStep, EnvSpec
from pamarl.errors import TrainingError, UsageError
from pamarl.nets.mlp import AgentMLP
from pamarl.nets.qnets import AgentQNet, DeterministicActor, masked_logits


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
    team_reward: str = "mean"
    """How a team critic or mixer (VDN, QMIX, HADDPG, HATD3) turns per-agent rewards into one: 'mean' or 'sum'."""
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
        if self.team_reward not in ("mean", "sum"):
            raise UsageError(f"team_reward must be 'mean' or 'sum', got {self.team_reward!r}")


@dataclass
class ValueConfig(OffPolicyConfig):
    """Hyperparameters of the value-based methods (IQL, VDN, QMIX)."""

    tau: float = 0.001
    """Soft target update factor. Slower than the actor-critics' 0.005: on MPE, QMIX's Q_tot ran away after
    ~60k steps with 0.005 (and with hard copies every 200 steps) and stayed stable with 0.001."""
    eps_start: float = 1.0
    """Initial exploration rate of epsilon-greedy."""
    eps_finish: float = 0.05
    """Final exploration rate."""
    eps_anneal_steps: int = 50_000
    """Env steps over which epsilon decays linearly from eps_start to eps_finish."""
    double_q: bool = True
    """Double Q-learning targets: argmax by the online network, value by the target network."""
    huber_delta: float = 0.0
    """Huber loss on the TD error with this delta (0: squared error)."""
    rnn: bool = False
    """GRU agents over the observation history; the replay then stores whole episodes."""
    rnn_hidden: int = 64
    """GRU width."""
    episode_batch: int = 32
    """Episodes per gradient step with rnn=true (32 x 25-step MPE episodes = 800 transitions: raise
    env_steps_per_update, e.g. to 25, to keep the replay ratio of the single-transition default)."""
    max_seq_len: int = 100
    """Longest stored sequence with rnn=true on tasks without an episode limit (longer episodes are cut)."""

    def validate(self) -> None:
        super().validate()
        if self.eps_anneal_steps < 0 or not (0 <= self.eps_finish <= 1 and 0 <= self.eps_start <= 1):
            raise UsageError("eps_start and eps_finish must lie in [0, 1] and eps_anneal_steps be >= 0")
        if self.rnn and (self.episode_batch < 1 or self.max_seq_len < 1):
            raise UsageError("episode_batch and max_seq_len must be >= 1")
        if self.rnn and self.n_step > 1:
            raise UsageError("n_step > 1 works on single transitions; with rnn=true use n_step=1")


@dataclass
class ActorCriticConfig(OffPolicyConfig):
    """Hyperparameters of the deterministic actor-critic methods (MADDPG, HADDPG, HATD3)."""

    lr: float = 5e-4
    """Actor learning rate (Adam)."""
    critic_lr: float = 1e-3
    """Critic learning rate (Adam)."""
    expl_noise: float = 0.1
    """Std of the Gaussian exploration noise added to continuous actions (in [-1, 1] units)."""
    random_warmup: bool = True
    """Act uniformly at random until learning_starts env steps are stored (TD3's start steps)."""
    critic_input: str = "state"
    """What the centralised critics see besides the joint action: 'state' or 'obs' (all observations)."""
    critic_hidden: tuple[int, ...] = (128, 128)
    """Hidden layer sizes of the critics."""

    def validate(self) -> None:
        super().validate()
        if self.critic_input not in ("state", "obs"):
            raise UsageError(f"critic_input must be 'state' or 'obs', got {self.critic_input!r}")
        if self.expl_noise < 0:
            raise UsageError(f"expl_noise must be >= 0, got {self.expl_noise}")


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


def team_reward(reward: torch.Tensor, how: str) -> torch.Tensor:
    """Per-agent rewards ``[..., N]`` to one team reward ``[...]`` (mean or sum)."""
    return reward.mean(-1) if how == "mean" else reward.sum(-1)


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


def adam(params: Iterable[nn.Parameter], lr: float, eps: float) -> torch.optim.Optimizer:
    """Adam with torch's default (foreach) implementation. Not ``fused=True``, although it is faster on
    a CPU: fused steps do not bump the parameters' version counters, which AgentMLP's cache of stacked
    weights relies on to notice that the weights changed."""
    return torch.optim.Adam(list(params), lr=lr, eps=eps)


def _clip(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    params = [p for p in params if p.grad is not None]
    if max_norm > 0:
        return nn.utils.clip_grad_norm_(params, max_norm)
    grads = [cast(torch.Tensor, p.grad) for p in params]
    return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) if grads else torch.zeros(())


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
        return bool(getattr(self.cfg, "rnn", False))

    def max_seq_len(self) -> int:
        limit = self.spec.episode_limit
        return int(limit) if limit else int(getattr(self.cfg, "max_seq_len", 100))

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
        return int(getattr(self.cfg, "episode_batch", 1)) if self.recurrent else self.cfg.batch_size

    def observe(self, obs: BatchObs, out: ActOut, step: BatchStep) -> None:
        self.replay.add(obs, out.extras["action"], step)
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
        for online, target in self.targets:
            if k > 0:
                if self.syncs % k == 0:
                    hard_update(target, online)
            else:
                soft_update(target, online, self.cfg.tau)

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

    @staticmethod
    def check_finite(loss: torch.Tensor, what: str) -> None:
        if not torch.isfinite(loss).all():
            raise TrainingError(
                f"{what} became NaN/inf. Checkpoints already written are intact; lower the learning rate "
                "(lr=..., critic_lr=...) or max_grad_norm and resume or restart."
            )

    def step_optimizer(self, opt: torch.optim.Optimizer, loss: torch.Tensor, params: list[nn.Parameter],
                       what: str) -> torch.Tensor:
        """Backward, clip and step; returns the gradient norm before clipping."""
        self.check_finite(loss, what)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = _clip(params, self.cfg.max_grad_norm)
        opt.step()
        return norm.detach()

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


# ====================================================================== value-based
class ValueBasedAlgorithm(OffPolicyAlgorithm):
    """IQL / VDN / QMIX: per-agent utilities, epsilon-greedy, double-Q targets, an optional mixer.

    A subclass sets :meth:`make_mixer` (``None``: independent learners) and may override :meth:`loss`.
    """

    Config = ValueConfig
    action_kinds = ("discrete",)
    cfg: ValueConfig

    def build(self) -> None:
        cfg, spec = self.cfg, self.spec
        self.qnet = AgentQNet(spec.n_agents, spec.obs_dim, spec.act_dim, cfg.hidden, cfg.activation, cfg.share_params,
                              cfg.agent_id, cfg.rnn, cfg.rnn_hidden).to(self.device)
        self.target_qnet = frozen_copy(self.qnet)
        self.nets = {"qnet": self.qnet, "target_qnet": self.target_qnet}
        self.targets = [(self.qnet, self.target_qnet)]
        params = list(self.qnet.parameters())
        self.mixer = self.make_mixer()
        self.target_mixer: nn.Module | None = None
        if self.mixer is not None:
            self.mixer.to(self.device)
            self.target_mixer = frozen_copy(self.mixer)
            self.nets.update(mixer=self.mixer, target_mixer=self.target_mixer)
            self.targets.append((self.mixer, self.target_mixer))
            params += list(self.mixer.parameters())
        self.params = params
        self.opts = {"q": adam(params, cfg.lr, cfg.adam_eps)}
        self.h_train: torch.Tensor | None = None
        self.h_eval: torch.Tensor | None = None
        self._eval_t = 0
        self._eval_hook = False
        self._last_explore: bool | None = None

    def make_mixer(self) -> nn.Module | None:
        return None

    # ------------------------------------------------------------------ acting
    def epsilon(self) -> float:
        c = self.cfg
        return linear_schedule(c.eps_start, c.eps_finish, c.eps_anneal_steps, self.env_steps)

    def explore_metrics(self) -> Metrics:
        return {"train/epsilon": self.epsilon()}

    def _hidden(self, explore: bool, batch: int) -> torch.Tensor | None:
        if not self.recurrent:
            return None
        if explore:
            if self.h_train is None or self.h_train.shape[0] != batch:
                self.h_train = self.qnet.init_hidden(batch, self.device)
            return self.h_train
        # Evaluation: the runner does not report eval episode ends yet, so a new evaluation is recognised
        # by the switch from training, and episodes end every episode_limit steps (exact for fixed-length
        # tasks; with :meth:`on_eval_step` called the real ends are used instead).
        new_eval = self._last_explore is not False or self.h_eval is None or self.h_eval.shape[0] != batch
        limit = self.spec.episode_limit
        if new_eval or (not self._eval_hook and limit and self._eval_t % limit == 0):
            self.h_eval = self.qnet.init_hidden(batch, self.device)
            self._eval_t = 0
        return self.h_eval

    def begin_eval(self) -> None:
        """Start of an evaluation (optional runner hook): forget the evaluation's recurrent states."""
        self.h_eval = None

    def on_eval_step(self, step: BatchStep) -> None:
        """Optional runner hook after each evaluation step: reset the states of finished episodes."""
        self._eval_hook = True
        if self.h_eval is not None:
            done = (step.terminated | step.truncated).to(self.device)
            self.h_eval[done] = 0.0

    @torch.no_grad()
    def act(self, obs: BatchObs, explore: bool = True) -> ActOut:
        o, mask = obs.obs.to(self.device), obs.action_mask.to(self.device)
        h = self._hidden(explore, o.shape[0])
        q, h = self.qnet(o, h)
        if explore:
            self.h_train = h
        else:
            self.h_eval = h
            self._eval_t += 1
        self._last_explore = explore
        a = masked_argmax(q, mask)
        if explore:
            allowed = (mask | ~mask.any(-1, keepdim=True)).float()
            rand = torch.multinomial(allowed.reshape(-1, allowed.shape[-1]).cpu(), 1, generator=self.generator)
            pick = torch.rand(a.shape, generator=self.generator) < self.epsilon()
            a = torch.where(pick.to(self.device), rand.reshape(a.shape).to(self.device), a)
        return ActOut(env_action=a.cpu(), extras={"action": a})

    def after_observe(self, step: BatchStep) -> None:
        if self.h_train is not None:
            done = (step.terminated | step.truncated).to(self.device)
            self.h_train[done] = 0.0

    def reset_rollout(self) -> None:
        super().reset_rollout()
        self.h_train = None

    # ------------------------------------------------------------------ learning
    def q_pairs(self, batch: TransitionBatch | EpisodeBatch) -> dict[str, torch.Tensor]:
        """Chosen-action values and bootstrap values with matching leading dims (``[B]`` or ``[B, T]``).

        Returns ``q [..., N]`` (online, with gradient), ``q_next [..., N]`` (double-Q or max target
        value of the successor) and the batch fields aligned to them, ``weight [...]`` marking real steps.
        """
        cfg = self.cfg
        if isinstance(batch, EpisodeBatch):
            q_all = self.qnet.unroll(batch.obs)  # [B, T+1, N, A]; step t+1 is the successor of step t
            q = q_all[:, :-1].gather(-1, batch.action.unsqueeze(-1)).squeeze(-1)
            with torch.no_grad():
                q_t = self.target_qnet.unroll(batch.obs)[:, 1:]
                nm = batch.action_mask[:, 1:]
                q_next = double_q_value(q_all[:, 1:].detach(), q_t, nm) if cfg.double_q else max_q_value(q_t, nm)
            return {"q": q, "q_next": q_next, "reward": batch.reward, "terminated": batch.terminated,
                    "discount": torch.full_like(batch.terminated, cfg.gamma), "active": batch.active[:, :-1].float(),
                    "next_active": batch.active[:, 1:].float(),
                    "state": batch.state[:, :-1], "next_state": batch.state[:, 1:], "weight": batch.filled}
        B = batch.obs.shape[0]
        if cfg.double_q:  # one forward for both the chosen and the successor's online values
            q_both, _ = self.qnet(torch.cat([batch.obs, batch.next_obs]))
            q_all, q_on_next = q_both[:B], q_both[B:].detach()
        else:
            q_all, _ = self.qnet(batch.obs)
        q = q_all.gather(-1, batch.action.unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            q_t, _ = self.target_qnet(batch.next_obs)
            nm = batch.next_action_mask
            q_next = double_q_value(q_on_next, q_t, nm) if cfg.double_q else max_q_value(q_t, nm)
        return {"q": q, "q_next": q_next, "reward": batch.reward, "terminated": batch.terminated,
                "discount": batch.discount, "active": batch.active.float(), "next_active": batch.next_active.float(),
                "state": batch.state, "next_state": batch.next_state, "weight": torch.ones(B, device=q.device)}

    def td_error_loss(self, err: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        d = self.cfg.huber_delta
        e = nn.functional.huber_loss(err, torch.zeros_like(err), reduction="none", delta=d) if d > 0 else err.pow(2)
        return (e * weight).sum() / weight.sum().clamp_min(1.0)

    def loss(self, p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mixed TD loss (VDN/QMIX eq.: ``(Q_tot - (r + gamma (1 - d) Q_tot^-(s', a'*)))^2``).

        Inactive agents enter the mixer with a zero utility. Subclasses without a mixer override this.
        """
        assert self.mixer is not None and self.target_mixer is not None
        q_tot = self.mixer(p["q"] * p["active"], p["state"])
        with torch.no_grad():
            q_tot_next = self.target_mixer(p["q_next"] * p["next_active"], p["next_state"])
            y = td_target(team_reward(p["reward"], self.cfg.team_reward), p["terminated"], q_tot_next, p["discount"])
        loss = self.td_error_loss(q_tot - y, p["weight"])
        w = p["weight"]
        return loss, {"train/q_tot": (q_tot.detach() * w).sum() / w.sum(), "train/target": (y * w).sum() / w.sum()}

    def train_step(self, batch: TransitionBatch | EpisodeBatch) -> dict[str, torch.Tensor]:
        p = self.q_pairs(batch)
        loss, extra = self.loss(p)
        norm = self.step_optimizer(self.opts["q"], loss, self.params, "the TD loss")
        m = p["active"] * p["weight"].unsqueeze(-1)
        return {"loss/td": loss.detach(), "train/q_taken": (p["q"].detach() * m).sum() / m.sum().clamp_min(1.0),
                "train/grad_norm": norm, **extra}


# ====================================================================== actor-critic
class ActorCriticAlgorithm(OffPolicyAlgorithm):
    """MADDPG / HADDPG / HATD3: deterministic actors and ``n_critics`` centralised critics ``Q(x, a)``.

    ``x`` is the global state (or all observations) and ``a`` the joint action: one-hot for discrete
    agents, the [-1, 1] action for continuous ones (padded dimensions zero), inactive agents zeroed.
    """

    Config = ActorCriticConfig
    cfg: ActorCriticConfig

    def n_critics(self) -> int:
        raise NotImplementedError

    def critic_shared(self) -> bool:
        return False

    def build(self) -> None:
        cfg, spec = self.cfg, self.spec
        self.actor = DeterministicActor(spec, cfg.hidden, cfg.activation, cfg.share_params, cfg.agent_id)
        self.actor.to(self.device)
        self.target_actor = frozen_copy(self.actor)
        x_dim = spec.state_dim if cfg.critic_input == "state" else spec.n_agents * spec.obs_dim
        k = self.n_critics()
        shared = self.critic_shared()
        self.critic = AgentMLP(k, x_dim + spec.n_agents * spec.act_dim, 1, cfg.critic_hidden, cfg.activation,
                               shared=shared, agent_id=shared).to(self.device)
        self.target_critic = frozen_copy(self.critic)
        self.nets = {"actor": self.actor, "target_actor": self.target_actor, "critic": self.critic,
                     "target_critic": self.target_critic}
        self.targets = [(self.actor, self.target_actor), (self.critic, self.target_critic)]
        groups = 1 if cfg.share_params else self.n
        # One optimiser per agent: a sequential update of one actor never moves another (nor its Adam moments).
        self.actor_opts = [adam(self.actor.agent_parameters(i), cfg.lr, cfg.adam_eps) for i in range(groups)]
        self.opts = {f"actor_{i}": o for i, o in enumerate(self.actor_opts)}
        self.opts["critic"] = adam(self.critic.parameters(), cfg.critic_lr, cfg.adam_eps)

    def actor_opt(self, i: int) -> torch.optim.Optimizer:
        return self.actor_opts[0 if self.cfg.share_params else i]

    # ------------------------------------------------------------------ acting
    def warming_up(self) -> bool:
        return self.cfg.random_warmup and self.env_steps < self.cfg.learning_starts

    @torch.no_grad()
    def act(self, obs: BatchObs, explore: bool = True) -> ActOut:
        o, mask = obs.obs.to(self.device), obs.action_mask.to(self.device)
        pre = self.actor(o)
        g = self.generator
        if self.spec.discrete:
            logits = masked_logits(pre, mask)
            if explore and self.warming_up():
                logits = torch.zeros_like(logits).masked_fill(logits <= -1e8, -1e9)
            if explore:  # Gumbel-max: a sample of softmax(logits), the policy MADDPG's relaxation trains
                u = torch.rand(logits.shape, generator=g).to(self.device).clamp(1e-20, 1.0)
                logits = logits - torch.log(-torch.log(u))
            a = logits.argmax(-1)
        else:
            a = self.actor.squash(pre)
            if explore and self.warming_up():
                a = (torch.rand(a.shape, generator=g).to(self.device) * 2 - 1) * self.actor.dim_mask
            elif explore and self.cfg.expl_noise > 0:
                noise = torch.randn(a.shape, generator=g).to(self.device) * self.cfg.expl_noise
                a = (a + noise).clamp(-1.0, 1.0) * self.actor.dim_mask
        return ActOut(env_action=self.actor.to_env(a).cpu(), extras={"action": a})

    # ------------------------------------------------------------------ critic helpers
    def critic_x(self, state: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        return state if self.cfg.critic_input == "state" else obs.flatten(-2)

    def encode(self, action: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Stored actions ``[B, N]`` long / ``[B, N, A]`` float -> critic encoding ``[B, N, A]``."""
        if self.spec.discrete:
            action = nn.functional.one_hot(action.long(), self.spec.act_dim).float()
        return action * active.unsqueeze(-1).float()

    def q_values(self, critic: nn.Module, x: torch.Tensor, joint: torch.Tensor) -> torch.Tensor:
        """Critic outputs ``[B, K]``. ``joint``: ``[B, N, A]`` (the same for every critic) or
        ``[B, K, N, A]`` (one joint action per critic, e.g. MADDPG's own-action substitution)."""
        k = self.n_critics()
        if joint.dim() == 3:
            joint = joint.unsqueeze(1).expand(-1, k, -1, -1)
        inp = torch.cat([x.unsqueeze(1).expand(-1, k, -1), joint.flatten(-2)], -1)
        return critic(inp).squeeze(-1)

    def target_actions(self, obs: torch.Tensor, mask: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """``mu'(o')`` encoded for the critic: greedy one-hot (discrete) or tanh action (continuous)."""
        pre = self.target_actor(obs)
        if self.spec.discrete:
            a = nn.functional.one_hot(masked_argmax(pre, mask), self.spec.act_dim).float()
        else:
            a = self.actor.squash(pre)
        return a * active.unsqueeze(-1).float()

    def critic_update(self, batch: TransitionBatch, y: torch.Tensor, weight: torch.Tensor | None = None
                      ) -> dict[str, torch.Tensor]:
        """Regress every critic on its target ``y [B, K]`` (mean squared TD error, summed over critics)."""
        x = self.critic_x(batch.state, batch.obs)
        q = self.q_values(self.critic, x, self.encode(batch.action, batch.active))
        err = (q - y).pow(2)
        if weight is None:
            loss = err.mean(0).sum()
        else:
            loss = ((err * weight).sum(0) / weight.sum(0).clamp_min(1.0)).sum()
        norm = self.step_optimizer(self.opts["critic"], loss, list(self.critic.parameters()), "the critic loss")
        return {"loss/critic": loss.detach() / q.shape[1], "train/q": q.detach().mean(), "train/target": y.mean(),
                "train/grad_norm_critic": norm}

    def critic_grad(self, on: bool) -> None:
        """Actor steps differentiate through the critic's input only; skip its parameter gradients."""
        for p in self.critic.parameters():
            p.requires_grad_(on)

    # ------------------------------------------------------------------ HA sequential actor update
    def sequential_actor_update(self, batch: TransitionBatch, critic_index: int = 0) -> dict[str, torch.Tensor]:
        """HADDPG/HATD3 actor step (Zhong et al. 2024, "Heterogeneous-Agent Reinforcement Learning",
        JMLR, Lemma 15 and the HAML template, Algorithm 2): agents draw a random order
        ``i_1..i_n`` (:func:`pamarl.algos.schedules.sequential`); agent ``i_m`` maximises
        ``Q(s, a_{i_1:m-1} = mu_new(o), a_{i_m} = mu_{i_m}(o), a_rest = mu_old(o))``, i.e. the agents updated
        before it act with their *new* policies, the others with their current ones, and its own action
        is the one being optimised. Continuous actions only (HARL's HADDPG/HATD3)."""
        plan = sequential(self.n, self.generator)
        x = self.critic_x(batch.state, batch.obs)
        act = batch.active.float().unsqueeze(-1)
        with torch.no_grad():
            joint = self.actor.squash(self.actor(batch.obs)) * act
        self.critic_grad(False)
        losses = []
        for i in plan.critical:
            a_i = self.actor.squash(self.actor(batch.obs[:, [i]], [i]), [i]) * act[:, [i]]
            cand = torch.cat([joint[:, :i], a_i, joint[:, i + 1:]], 1)
            q = self.q_values(self.critic, x, cand)[:, critic_index]
            w = batch.active[:, i].float()
            loss = -(q * w).sum() / w.sum().clamp_min(1.0)
            self.step_optimizer(self.actor_opt(i), loss, self.actor.agent_parameters(i), f"the actor loss of agent {i}")
            losses.append(loss.detach())
            with torch.no_grad():  # later agents see this agent's updated action
                joint[:, i] = self.actor.squash(self.actor(batch.obs[:, [i]], [i]), [i])[:, 0] * act[:, i]
        self.critic_grad(True)
        self.last_order = plan.critical
        return {"loss/actor": torch.stack(losses).mean()}

    def update(self, progress: Progress) -> Metrics:
        metrics = super().update(progress)
        order = getattr(self, "last_order", None)
        if order is not None:
            metrics["sched/order"] = ";".join(str(i) for i in order)
        return metrics
