"""Value-based off-policy learners (IQL, VDN, QMIX) on the replay template of :mod:`pamarl.algos.offpolicy`.

Per-agent utilities ``Q_i(o_i, .)`` (MLP or GRU), epsilon-greedy over allowed actions, double-Q targets
and optionally a mixer ``Q_tot = f(Q, s)`` (VDN: sum; QMIX: monotonic on the state).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pamarl.algos.base import ActOut, Metrics
from pamarl.algos.common import fused_adam
from pamarl.algos.offpolicy import (
    OffPolicyAlgorithm,
    OffPolicyConfig,
    double_q_value,
    frozen_copy,
    linear_schedule,
    masked_argmax,
    max_q_value,
    td_target,
)
from pamarl.buffers.replay import EpisodeBatch, TransitionBatch
from pamarl.envs.base import BatchObs
from pamarl.errors import UsageError
from pamarl.nets import manual
from pamarl.nets.qnets import AgentQNet


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



# ====================================================================== value-based
class ValueBasedAlgorithm(OffPolicyAlgorithm):
    """IQL / VDN / QMIX: per-agent utilities, epsilon-greedy, double-Q targets, an optional mixer.

    A subclass sets :meth:`make_mixer` (``None``: independent learners) and may override :meth:`loss`.
    """

    Config = ValueConfig
    action_kinds = ("discrete",)
    supports_recurrent = True
    cfg: ValueConfig

    @property
    def recurrent(self) -> bool:
        return self.cfg.rnn

    def max_seq_len(self) -> int:
        limit = self.spec.episode_limit
        return int(limit) if limit else self.cfg.max_seq_len

    def batch_size(self) -> int:
        return self.cfg.episode_batch if self.recurrent else self.cfg.batch_size

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
        self.opts = {"q": fused_adam(params, cfg.lr, cfg.adam_eps)}
        # Hand-written backward of the agents' relu MLPs (nets.manual; autograd for GRU agents and the mixer).
        self.manual_grads = not cfg.rnn and manual.supports(self.qnet.mlp)
        self._agent_tape: tuple[manual.Tape, torch.Tensor] | None = None  # q_pairs -> train_step
        # Recurrent states of the training rollout and of evaluations, kept apart so that an evaluation in
        # the middle of a rollout never disturbs the training episodes.
        self.h_train: torch.Tensor | None = None
        self.h_eval: torch.Tensor | None = None

    def make_mixer(self) -> nn.Module | None:
        return None

    # ------------------------------------------------------------------ acting
    def epsilon(self) -> float:
        c = self.cfg
        return linear_schedule(c.eps_start, c.eps_finish, c.eps_anneal_steps, self.env_steps)

    def explore_metrics(self) -> Metrics:
        return {"train/epsilon": self.epsilon()}

    def _hidden(self, first: torch.Tensor) -> torch.Tensor | None:
        """The recurrent state to act from: zero where ``first`` marks an episode start (or none yet)."""
        if not self.recurrent:
            return None
        h = self.h_eval if self.evaluating else self.h_train
        if h is None or h.shape[0] != first.shape[0]:
            return self.qnet.init_hidden(first.shape[0], self.device)
        return h.masked_fill(first.to(self.device).view(-1, *[1] * (h.dim() - 1)), 0.0)

    @torch.no_grad()
    def act(self, obs: BatchObs, explore: bool = True) -> ActOut:
        o, mask = obs.obs.to(self.device), obs.action_mask.to(self.device)
        q, h = self.qnet(o, self._hidden(obs.first))
        if self.evaluating:
            self.h_eval = h
        else:
            self.h_train = h
        a = masked_argmax(q, mask)
        if explore:
            g = self.generator
            allowed = (mask | ~mask.any(-1, keepdim=True)).float()
            rand = torch.multinomial(allowed.reshape(-1, allowed.shape[-1]), 1, generator=g).reshape(a.shape)
            pick = torch.rand(a.shape, generator=g, device=self.device) < self.epsilon()
            a = torch.where(pick, rand, a)
        return ActOut(env_action=a, action=a)

    def evaluation(self):  # type: ignore[no-untyped-def]
        self.h_eval = None  # every evaluation starts from reset envs
        return super().evaluation()

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
        obs = torch.cat([batch.obs, batch.next_obs]) if cfg.double_q else batch.obs
        if self.manual_grads:
            # The agents' MLP runs without a graph (nets.manual): the loss's backward stops at the values
            # q_all, a leaf, and train_step takes their gradient through the MLP by hand.
            q_both, tape = manual.forward(self.qnet.mlp, obs)
            q_all = q_both[:B].detach().requires_grad_(True)
            self._agent_tape = (tape, q_all)
        else:
            q_both, _ = self.qnet(obs)  # with double Q, one forward for the chosen and the successor's values
            q_all = q_both[:B]
        if cfg.double_q:
            q_on_next = q_both[B:].detach()
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
            y = td_target(self.team_reward(p["reward"]), p["terminated"], q_tot_next, p["discount"])
        loss = self.td_error_loss(q_tot - y, p["weight"])
        w = p["weight"]
        return loss, {"train/q_tot": (q_tot.detach() * w).sum() / w.sum(), "train/target": (y * w).sum() / w.sum()}

    def train_step(self, batch: TransitionBatch | EpisodeBatch) -> dict[str, torch.Tensor]:
        p = self.q_pairs(batch)
        loss, extra = self.loss(p)
        backward = None
        if self._agent_tape is not None:
            tape, q_all = self._agent_tape
            self._agent_tape = None

            def backward() -> None:
                loss.backward()  # the mixer's parameters, and dL/dq_all
                if q_all.grad is not None:  # the agents' MLPs, over the rows that carry gradient
                    manual.backward(tape, q_all.grad, rows=q_all.shape[0])

        norm = self.step_optimizer(self.opts["q"], loss, self.params, "the TD loss", backward)
        m = p["active"] * p["weight"].unsqueeze(-1)
        return {"loss/td": loss.detach(), "train/q_taken": (p["q"].detach() * m).sum() / m.sum().clamp_min(1.0),
                "train/grad_norm": norm, **extra}
