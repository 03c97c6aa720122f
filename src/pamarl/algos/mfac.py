"""MF-AC: mean-field actor-critic (Yang et al. 2018, arXiv 1802.05438, Sec. 3.2 and Algorithm 2).

A team-shared actor ``pi_theta(a | o)`` and a team-shared critic ``Q_phi(o, a, mean_a)`` -- the same network
shape as MF-Q's (:class:`pamarl.nets.meanfield.MeanFieldNet`). Every runner iteration takes one joint step on
the agent transitions it just collected (on-policy, like the authors' code), after ``critic_updates`` steps on
rows replayed from the last ``critic_replay`` transitions (not in the paper; see below).

* critic: ``(Q_phi(o, a, mean_a) - y)^2`` with ``y = r + gamma (1 - done) v^MF(o')`` and
  ``v^MF(o') = sum_a pi_theta(a | o') Q_phi(o', a, mean_a')`` (eq. 10 with the actor as the policy);
* actor: the paper's policy gradient ``E_a~pi[grad log pi_theta(a | o) Q_phi(o, a, mean_a)]`` with the baseline
  ``V(o) = sum_b pi(b | o) Q_phi(o, b, mean_a)`` and an entropy bonus. ``actor_grad=sampled`` estimates it from
  the one action taken, ``-log pi(a | o) (Q(o, a, mean_a) - V(o))`` (the authors' code); ``all_actions`` (the
  default) computes the expectation over the discrete actions exactly, ``-sum_b pi(b | o) stopgrad(Q(o, b,
  mean_a) - V(o))`` (Mean Actor-Critic, Allen et al. 2017, arXiv 1709.00503): same expected gradient, no
  sampling noise, and every action the critic values above ``V`` gains probability on every row.

Deaths are terminal transitions (kept). Acting samples from the actor; evaluation takes its argmax.

Why the defaults differ from the paper's purely on-policy Algorithm 2 (``actor_grad=sampled critic_replay=0
critic_updates=0 actor_replay=false`` restores it): on a battle, hitting an adjacent enemy (+0.2, -0.1 attack
penalty) is 0.6% of transitions under random play. Used once each, the on-policy critic learns the penalty long
before the hit, and the actor gives attacks up; the team learns to stand still (README, "MF-AC and AC").
Replayed critic steps are valid because the critic's v^MF target is an expectation over the *current* actor
(expected-SARSA style), and they teach the critic the hit; but the sampled actor gradient still moves only the
action taken, and the actor does not follow. The all-actions gradient follows the critic on every action, and
because it does not use the action taken it is also a valid policy-improvement step on replayed states
(``actor_replay``, as in discrete SAC). Measured on a 12 v 12 battle against random soldiers at 8,000 env steps:
only this combination learns to fight (README).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from pamarl.algos.base import ActOut, Algorithm, LearnerConfig, Metrics, Progress
from pamarl.algos.common import adam, optimizer_step
from pamarl.algos.meanfield import MeanActionTracker, MeanFieldNetConfig, agent_rows, mf_target, mf_value
from pamarl.algos.registry import register
from pamarl.buffers.agent_replay import AgentReplay
from pamarl.config import TrainConfig
from pamarl.envs.base import BatchObs, BatchStep, EnvSpec
from pamarl.errors import TrainingError, UsageError
from pamarl.nets.meanfield import MeanFieldNet


@dataclass
class MFACConfig(MeanFieldNetConfig, LearnerConfig):
    """Hyperparameters of MF-AC and AC (parameters are always shared across the team; ``lr`` for actor and
    critic, the mean-action embedding feeds the critic)."""

    value_coef: float = 0.1
    """Weight of the critic loss in the joint loss (the authors' 0.1)."""
    ent_coef: float = 0.08
    """Entropy bonus weight (the authors' 0.08)."""
    critic_replay: int = 50_000
    """Agent transitions kept in a replay for extra critic steps (0: purely on-policy, as the authors). The
    critic's target ``r + gamma (1 - done) sum_a' pi(a' | o') Q(o', a', mean_a')`` takes the expectation over
    the *current* actor, so it is correct on transitions of older policies (expected-SARSA style); this lets the
    critic learn rare events (a hit on an adjacent enemy: 0.6% of transitions under random play) before the
    actor, following its advantage, gives attacks up."""
    critic_updates: int = 48
    """Critic-only gradient steps per iteration on ``critic_batch`` rows sampled from ``critic_replay``."""
    critic_batch: int = 128
    """Rows per critic-only step."""
    actor_grad: str = "all_actions"
    """Policy-gradient estimator of the actor. 'sampled': ``-log pi(a | o) (Q(o, a, mean_a) - V(o))`` on the one
    action taken (the paper's Algorithm 2). 'all_actions': ``-sum_b pi(b | o) stopgrad(Q(o, b, mean_a) - V(o))``,
    the same expectation E_a~pi[grad log pi(a | o) Q(o, a, mean_a)] computed exactly over the discrete actions,
    so every action the critic values above V gains probability on every row, not only the one sampled."""
    actor_replay: bool = True
    """With ``actor_grad=all_actions``: the ``critic_updates`` replay steps also step the actor, on the joint
    loss. The all-actions loss ``-sum_b pi(b | o) A(o, b)`` does not use the action taken, so it is a valid policy
    improvement step on states of older policies (as in Mean Actor-Critic, Allen et al. 2017, and discrete SAC);
    the sampled gradient is not (its action came from another policy), hence the restriction."""
    checkpoint_replay: bool = False
    """Save the critic replay in checkpoints (exact resume; without it a resumed run starts with an empty one)."""
    chunk: int = 4096
    """Agent transitions per backward pass (gradients are accumulated; one optimiser step per iteration)."""

    def validate(self) -> None:
        if not 0.0 <= self.gamma <= 1.0 or self.chunk < 1 or self.ent_coef < 0 or self.value_coef < 0:
            raise UsageError("gamma must lie in [0, 1]; chunk >= 1; ent_coef, value_coef >= 0")
        self.check_neighbourhood()
        if self.critic_replay < 0 or self.critic_updates < 0 or self.critic_batch < 1:
            raise UsageError("critic_replay and critic_updates must be >= 0 and critic_batch >= 1")
        if self.critic_updates > 0 and self.critic_replay == 0:
            raise UsageError("critic_updates > 0 needs a critic_replay (its capacity in agent transitions)")
        if self.actor_grad not in ("sampled", "all_actions"):
            raise UsageError(f"actor_grad must be 'sampled' or 'all_actions', got {self.actor_grad!r}")
        if self.actor_replay and (self.actor_grad != "all_actions" or self.critic_updates == 0):
            raise UsageError("actor_replay=true needs actor_grad=all_actions (the sampled gradient is on-policy "
                             "only) and critic_replay, critic_updates > 0 (the replay steps it joins); set "
                             "actor_replay=false for the paper's purely on-policy MF-AC (actor_grad=sampled "
                             "critic_replay=0 critic_updates=0)")


@register
class MFAC(Algorithm):
    """Mean-field actor-critic with team-shared actor and critic."""

    name = "mfac"
    homogeneous_agents_only = True
    Config = MFACConfig
    action_kinds = ("discrete",)
    paper = "Yang et al. 2018, Mean Field Multi-Agent Reinforcement Learning (MF-AC)"
    mean_action: ClassVar[bool] = True
    """The critic takes the neighbours' mean action (False: the AC baseline)."""
    cfg: MFACConfig

    def __init__(self, spec: EnvSpec, cfg: MFACConfig, run: TrainConfig, device: torch.device):
        super().__init__(spec, cfg, run, device)
        A = spec.act_dim
        self.mean_dim = A if self.mean_action else 0
        lay = spec.obs_layout
        self.actor = MeanFieldNet(spec.obs_dim, A, lay, 0, cfg.conv_channels, cfg.embed, cfg.mean_embed,
                                  cfg.hidden).to(device)
        self.critic = MeanFieldNet(spec.obs_dim, A, lay, self.mean_dim, cfg.conv_channels, cfg.embed, cfg.mean_embed,
                                   cfg.hidden).to(device)
        self.params = list(self.actor.parameters()) + list(self.critic.parameters())
        self.opt = adam(self.params, cfg.lr, cfg.adam_eps)
        self.tracker = MeanActionTracker(spec, cfg.neighbourhood, cfg.radius) if self.mean_action else None
        self._mean: torch.Tensor | None = None
        cap = max(1, run.num_envs * run.rollout_len * spec.n_agents)
        self.batch = AgentReplay(cap, spec.obs_dim, A, self.mean_dim, device, torch.float32)
        self.replay = AgentReplay(cfg.critic_replay, spec.obs_dim, A, self.mean_dim, device, torch.float16) \
            if cfg.critic_replay > 0 else None
        self.env_steps = 0
        self.updates = 0

    @torch.no_grad()
    def act(self, obs: BatchObs, explore: bool = True) -> ActOut:
        o = obs.obs.to(self.device)
        mean = self.tracker.current(obs, not self.evaluating, self.device) if self.tracker is not None else None
        logits = self.actor(o).masked_fill(~obs.action_mask.to(self.device), -1e9)
        if explore:
            flat = torch.softmax(logits, -1).reshape(-1, logits.shape[-1]).cpu()
            a = torch.multinomial(flat, 1, generator=self.generator).reshape(logits.shape[:-1]).to(self.device)
        else:
            a = logits.argmax(-1)
        if self.tracker is not None:
            self.tracker.record(a, obs, not self.evaluating)
        if not self.evaluating:
            self._mean = mean  # stored with the transition by observe, which the runner calls next
        return ActOut(env_action=a.cpu(), action=a)

    def observe(self, obs: BatchObs, out: ActOut, step: BatchStep) -> None:
        rows = agent_rows(obs, out.action, self._mean, step, self.tracker, self.device)
        self.batch.add(rows)
        if self.replay is not None:
            self.replay.add(rows)
        self.env_steps += obs.obs.shape[0]

    def reset_rollout(self) -> None:
        if self.tracker is not None:
            self.tracker.reset()

    @torch.no_grad()
    def td_target(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        """``y = r + gamma (1 - done) sum_a' pi(a' | o') Q(o', a', mean_a')`` (eqs. 9-11 with the current actor
        as the policy of v^MF); actions masked at ``o'`` get no probability."""
        nl = self.actor(b["next_obs"]).masked_fill(~b["next_mask"], -1e9)
        v_next = mf_value(torch.softmax(nl, -1), self.critic(b["next_obs"], b["next_mean"]))
        return mf_target(b["reward"], b["done"], v_next, self.cfg.gamma)

    def critic_loss(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        """The critic's TD loss alone, ``(Q(o, a, mean_a) - y)^2`` (:meth:`td_target`)."""
        q = self.critic(b["obs"], b["mean"]).gather(-1, b["action"].unsqueeze(-1)).squeeze(-1)
        return (q - self.td_target(b)).pow(2).mean()

    def losses(self, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Joint loss ``actor + value_coef * critic`` (means over the rows of ``b``)."""
        logits = self.actor(b["obs"])
        logp_all = torch.log_softmax(logits, -1)
        pi = logp_all.exp()
        q_all = self.critic(b["obs"], b["mean"])
        q = q_all.gather(-1, b["action"].unsqueeze(-1)).squeeze(-1)
        y = self.td_target(b)
        with torch.no_grad():
            adv_all = q_all.detach() - mf_value(pi.detach(), q_all.detach()).unsqueeze(-1)
        critic_loss = (q - y).pow(2).mean()
        entropy = -(pi * logp_all).sum(-1).mean()
        if self.cfg.actor_grad == "all_actions":
            # sum_b grad pi(b) A(b) = E_b~pi[grad log pi(b) A(b)]: the paper's gradient without sampling the action
            pg = -(pi * adv_all).sum(-1).mean()
        else:
            logp = logp_all.gather(-1, b["action"].unsqueeze(-1)).squeeze(-1)
            pg = -(logp * adv_all.gather(-1, b["action"].unsqueeze(-1)).squeeze(-1)).mean()
        actor_loss = pg - self.cfg.ent_coef * entropy
        loss = actor_loss + self.cfg.value_coef * critic_loss
        return loss, {"loss/actor": actor_loss.detach(), "loss/critic": critic_loss.detach(),
                      "train/entropy": entropy.detach(), "train/q_taken": q.mean().detach()}

    def replay_steps(self) -> float:
        """``critic_updates`` steps on rows sampled from the replay: the critic's loss alone, or with
        ``actor_replay`` the joint loss (the all-actions actor loss needs no on-policy action). Returns the mean
        loss."""
        assert self.replay is not None
        params = self.params if self.cfg.actor_replay else list(self.critic.parameters())
        total = 0.0
        for _ in range(self.cfg.critic_updates):
            rb = self.replay.sample(self.cfg.critic_batch, self.generator)
            loss = self.losses(rb)[0] if self.cfg.actor_replay else self.critic_loss(rb)
            optimizer_step(self.opt, loss, params, self.cfg.max_grad_norm, f"{self.name}'s replayed loss")
            total += float(loss.detach())
        return total / self.cfg.critic_updates

    def update(self, progress: Progress) -> Metrics:
        n = len(self.batch)
        if n == 0:
            return {}
        extra: dict[str, float] = {}
        if self.replay is not None and self.cfg.critic_updates > 0 and len(self.replay) > 0:
            extra["loss/critic_replay"] = self.replay_steps()
        data = self.batch.newest(n)
        self.opt.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for s in range(0, n, self.cfg.chunk):
            part = {k: v[s:s + self.cfg.chunk] for k, v in data.items()}
            w = part["action"].shape[0] / n
            loss, m = self.losses(part)
            if not torch.isfinite(loss):
                raise TrainingError(f"{self.name} loss became NaN/inf; lower lr and restart")
            (loss * w).backward()
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v) * w
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm) if self.cfg.max_grad_norm > 0 \
            else torch.zeros(())
        self.opt.step()
        self.batch.clear()
        self.updates += 1
        return {**sums, **extra, "train/grad_norm": float(norm), "train/agent_transitions": float(n),
                "train/batch_mb": self.batch.nbytes() / 2**20, "train/updates": float(self.updates)}

    def policy_state_dict(self) -> dict[str, Any]:
        return {"actor": self.actor.state_dict(), "critic": self.critic.state_dict()}

    def load_policy_state_dict(self, state: dict[str, Any]) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])

    def state_dict(self) -> dict[str, Any]:
        state = {**self.policy_state_dict(), "opt": self.opt.state_dict(),
                 "counters": {"env_steps": self.env_steps, "updates": self.updates}, "rng": self._rng_state()}
        if self.replay is not None and self.cfg.checkpoint_replay:
            state["replay"] = self.replay.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_policy_state_dict(state)
        self.opt.load_state_dict(state["opt"])
        self.env_steps, self.updates = int(state["counters"]["env_steps"]), int(state["counters"]["updates"])
        self._load_rng_state(state["rng"])
        if self.replay is not None and "replay" in state:
            self.replay.load_state_dict(state["replay"])
        self.batch.clear()
        self.reset_rollout()

