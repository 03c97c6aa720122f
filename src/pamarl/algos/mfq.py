"""MF-Q: mean-field Q-learning (Yang et al. 2018, arXiv 1802.05438, Algorithm 1; eqs. 8-12).

Each agent's Q-function takes its observation, its action and the mean action of its neighbours,
``Q(o^j, a^j, mean_a^j)`` (eq. 8), with one network shared by the whole team (view encoder + feature MLP +
mean-action input: :class:`pamarl.nets.meanfield.MeanFieldNet`). Agents act by Boltzmann sampling
(eq. 12) at a temperature annealed from ``temp_start`` to ``temp_finish``; evaluation is greedy. The
loss is ``(Q(o, a, mean_a) - y)^2`` with the mean-field target ``y = r + gamma (1 - done) v^MF(o')``,
``v^MF(o') = sum_a pi(a | o', mean_a') Q^-(o', a, mean_a')`` (eqs. 9-11); ``pi`` is the Boltzmann policy of
the target network, or of the online network with ``double_q=true`` (the authors' code). The target
network follows by soft updates ``theta^- <- tau theta + (1 - tau) theta^-``.

Replay rows are single-agent transitions (:mod:`pamarl.buffers.agent_replay`) whose successor is stored
in the row; deaths are terminal transitions that are kept. Counting: ``buffer_size`` and
``learning_starts`` count *agent* transitions; one gradient step is due per ``agent_steps_per_update``
agent transitions stored. Runs on any task whose agents are many and homogeneous, e.g.
``pamarl train --algo mfq --env "mpe/simple_spread_v3?N=6"`` or ``--env "magent2/battle_v4?map_size=40"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from pamarl.algos.base import ActOut, Metrics
from pamarl.algos.common import adam
from pamarl.algos.meanfield import (
    MeanActionTracker,
    MeanFieldNetConfig,
    agent_rows,
    boltzmann,
    mf_target,
    mf_value,
)
from pamarl.algos.offpolicy import (
    OffPolicyAlgorithm,
    OffPolicyConfig,
    double_q_value,
    frozen_copy,
    linear_schedule,
    masked_argmax,
    max_q_value,
)
from pamarl.algos.registry import register
from pamarl.buffers.agent_replay import AgentReplay
from pamarl.envs.base import BatchObs, BatchStep
from pamarl.errors import UsageError
from pamarl.nets.meanfield import MeanFieldNet


@dataclass
class MFQConfig(MeanFieldNetConfig, OffPolicyConfig):
    """Hyperparameters of MF-Q and IL (parameters are always shared across the team)."""

    batch_size: int = 512
    """Agent transitions per gradient step."""
    buffer_size: int = 100_000
    """Replay capacity in agent transitions (preallocated on the first step; see train/replay_mb)."""
    learning_starts: int = 2_000
    """Agent transitions stored before the first gradient step."""
    agent_steps_per_update: float = 256.0
    """One gradient step per this many agent transitions stored (batch_size / this = replay ratio)."""
    tau: float = 0.01
    """Soft target update factor after every gradient step."""
    temp_start: float = 1.0
    """Boltzmann temperature T = 1 / beta at the start (eq. 12)."""
    temp_finish: float = 0.1
    """Final temperature."""
    temp_anneal_steps: int = 50_000
    """Env steps over which T moves linearly from temp_start to temp_finish."""
    double_q: bool = False
    """Boltzmann weights of v^MF from the online network (double-DQN style) instead of the target network;
    for IL: double-DQN's argmax by the online network."""
    huber_delta: float = 0.0
    """Huber loss with this delta (0: squared error)."""
    obs_fp16: bool = True
    """Keep replay observations in float16 (halves the replay's memory)."""
    checkpoint_replay: bool = False
    """Save the replay in checkpoints (exact resume; it can be gigabytes on large battles)."""

    def validate(self) -> None:
        super().validate()
        if self.n_step != 1:
            raise UsageError("mean-field algorithms use one-step targets (n_step=1)")
        if self.temp_start <= 0 or self.temp_finish <= 0 or self.temp_anneal_steps < 0:
            raise UsageError("temp_start and temp_finish must be > 0 and temp_anneal_steps >= 0")
        self.check_neighbourhood()
        if self.agent_steps_per_update <= 0:
            raise UsageError("agent_steps_per_update must be > 0")


@register
class MFQ(OffPolicyAlgorithm):
    """Mean-field Q-learning with a team-shared network."""

    name = "mfq"
    homogeneous_agents_only = True
    Config = MFQConfig
    action_kinds = ("discrete",)
    paper = "Yang et al. 2018, Mean Field Multi-Agent Reinforcement Learning (MF-Q)"
    mean_action: ClassVar[bool] = True
    """Condition Q on the neighbours' mean action (False: the IL baseline)."""
    cfg: MFQConfig

    def build(self) -> None:
        cfg, spec = self.cfg, self.spec
        A = spec.act_dim
        self.mean_dim = A if self.mean_action else 0
        self.qnet = MeanFieldNet(spec.obs_dim, A, spec.obs_layout, self.mean_dim, cfg.conv_channels, cfg.embed,
                                 cfg.mean_embed, cfg.hidden).to(self.device)
        self.target_qnet = frozen_copy(self.qnet)
        self.nets = {"qnet": self.qnet, "target_qnet": self.target_qnet}
        self.targets = [(self.qnet, self.target_qnet)]
        self.opts = {"q": adam(self.qnet.parameters(), cfg.lr, cfg.adam_eps)}
        self.tracker = MeanActionTracker(spec, cfg.neighbourhood, cfg.radius) if self.mean_action else None
        self._mean: torch.Tensor | None = None

    def make_replay(self) -> AgentReplay:  # type: ignore[override]
        return AgentReplay(self.cfg.buffer_size, self.spec.obs_dim, self.spec.act_dim, self.mean_dim, self.device,
                           torch.float16 if self.cfg.obs_fp16 else torch.float32)

    # ------------------------------------------------------------------ acting
    def temperature(self) -> float:
        c = self.cfg
        return linear_schedule(c.temp_start, c.temp_finish, c.temp_anneal_steps, self.env_steps)

    def explore_metrics(self) -> Metrics:
        assert isinstance(self.replay, AgentReplay)
        return {"train/temperature": self.temperature(), "train/replay_mb": self.replay.nbytes() / 2**20}

    @torch.no_grad()
    def act(self, obs: BatchObs, explore: bool = True) -> ActOut:
        o, mask = obs.obs.to(self.device), obs.action_mask.to(self.device)
        mean = self.tracker.current(obs, not self.evaluating, self.device) if self.tracker is not None else None
        q = self.qnet(o, mean)
        if explore:
            probs = boltzmann(q, self.temperature(), mask)
            flat = probs.reshape(-1, probs.shape[-1]).cpu()
            a = torch.multinomial(flat, 1, generator=self.generator).reshape(q.shape[:-1]).to(self.device)
        else:
            a = masked_argmax(q, mask)
        if self.tracker is not None:
            self.tracker.record(a, obs, not self.evaluating)
        if not self.evaluating:
            self._mean = mean  # stored with the transition by observe, which the runner calls next
        return ActOut(env_action=a.cpu(), action=a)

    def observe(self, obs: BatchObs, out: ActOut, step: BatchStep) -> None:
        rows = agent_rows(obs, out.action, self._mean, step, self.tracker, self.device)
        assert isinstance(self.replay, AgentReplay)
        self.replay.add(rows)
        k = int(rows["action"].shape[0])
        self.env_steps += obs.obs.shape[0]
        self.replay_steps += k
        if self.learning():
            self._due += k / self.cfg.agent_steps_per_update

    def reset_rollout(self) -> None:
        if self.tracker is not None:
            self.tracker.reset()

    # ------------------------------------------------------------------ learning
    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        assert isinstance(self.replay, AgentReplay)
        return self.replay.sample(batch_size, self.generator)

    def batch_size(self) -> int:
        return self.cfg.batch_size

    def next_value(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        """v^MF(o') of eq. 10 under the Boltzmann policy at the current temperature."""
        q_t = self.target_qnet(b["next_obs"], b["next_mean"])
        src = self.qnet(b["next_obs"], b["next_mean"]) if self.cfg.double_q else q_t
        return mf_value(boltzmann(src, self.temperature(), b["next_mask"]), q_t)

    def train_step(self, batch: Any) -> dict[str, torch.Tensor]:
        b: dict[str, torch.Tensor] = batch
        q = self.qnet(b["obs"], b["mean"]).gather(-1, b["action"].unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            y = mf_target(b["reward"], b["done"], self.next_value(b), self.cfg.gamma)
        d = self.cfg.huber_delta
        err = q - y
        loss = nn.functional.huber_loss(q, y, delta=d) if d > 0 else err.pow(2).mean()
        norm = self.step_optimizer(self.opts["q"], loss, list(self.qnet.parameters()), f"{self.name} loss")
        return {"loss/q": loss.detach(), "train/q_taken": q.mean().detach(), "train/target": y.mean(),
                "train/grad_norm": norm}

    # ------------------------------------------------------------------ policy weights (opponents)
    def policy_state_dict(self) -> dict[str, Any]:
        """The acting network and the env-step count that sets the Boltzmann temperature (eq. 12), so that a
        frozen copy that samples (a self-play or checkpoint opponent with ``opponent_explore=true``,
        ``pamarl battle --sample``) samples at the learner's temperature, not at ``temp_start``."""
        return {"nets": {"qnet": self.qnet.state_dict()}, "counters": {"env_steps": self.env_steps}}

    def load_policy_state_dict(self, state: dict[str, Any]) -> None:
        """Load the acting network (and the temperature's env-step count when given) from
        :meth:`policy_state_dict` or a full checkpoint state."""
        self.qnet.load_state_dict(state["nets"]["qnet"])
        self.target_qnet.load_state_dict(state["nets"]["qnet"])
        if "counters" in state:
            self.env_steps = int(state["counters"]["env_steps"])


def il_next_value(algo: MFQ, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """Q-learning's ``max_a Q^-(o', a)`` (double-DQN: ``Q^-(o', argmax_a Q(o', a))``), for IL."""
    q_t = algo.target_qnet(b["next_obs"], None)
    if algo.cfg.double_q:
        return double_q_value(algo.qnet(b["next_obs"], None), q_t, b["next_mask"])
    return max_q_value(q_t, b["next_mask"])
