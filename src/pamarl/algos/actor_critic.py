"""Deterministic actor-critic off-policy learners (MADDPG, HADDPG, HATD3) on the replay template.

Deterministic actors, centralised critics ``Q(s, a_1..a_N)``, Gaussian (continuous) or Gumbel
(discrete) exploration, and the HA family's sequential actor update over
:func:`pamarl.algos.schedules.sequential`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pamarl.algos.base import ActOut, Metrics, Progress
from pamarl.algos.common import fused_adam
from pamarl.algos.offpolicy import OffPolicyAlgorithm, OffPolicyConfig, frozen_copy, masked_argmax
from pamarl.algos.schedules import sequential
from pamarl.buffers.replay import TransitionBatch
from pamarl.envs.base import BatchObs
from pamarl.errors import UsageError
from pamarl.nets import manual
from pamarl.nets.mlp import AgentMLP
from pamarl.nets.qnets import DeterministicActor, masked_logits


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
                               shared=shared, agent_id=shared, stacked=True).to(self.device)
        self.target_critic = frozen_copy(self.critic)
        self.nets = {"actor": self.actor, "target_actor": self.target_actor, "critic": self.critic,
                     "target_critic": self.target_critic}
        self.targets = [(self.actor, self.target_actor), (self.critic, self.target_critic)]
        groups = 1 if cfg.share_params else self.n
        # Parameter lists built once: walking the modules for them every gradient step cost ~5% of a step.
        self.actor_params = [self.actor.agent_parameters(i) for i in range(groups)]
        self.critic_params = list(self.critic.parameters())
        # One optimiser per agent: a sequential update of one actor never moves another (nor its Adam moments).
        self.actor_opts = [fused_adam(ps, cfg.lr, cfg.adam_eps) for ps in self.actor_params]
        self.opts = {f"actor_{i}": o for i, o in enumerate(self.actor_opts)}
        self.opts["critic"] = fused_adam(self.critic.parameters(), cfg.critic_lr, cfg.adam_eps)
        # Hand-written backward passes for relu MLPs (nets.manual; autograd otherwise): fewer ops per step.
        self.manual_grads = manual.supports(self.critic) and manual.supports(self.actor.body)

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
                u = torch.rand(logits.shape, generator=g, device=self.device).clamp(1e-20, 1.0)
                logits = logits - torch.log(-torch.log(u))
            a = logits.argmax(-1)
        else:
            a = self.actor.squash(pre)
            if explore and self.warming_up():
                a = (torch.rand(a.shape, generator=g, device=self.device) * 2 - 1) * self.actor.dim_mask
            elif explore and self.cfg.expl_noise > 0:
                noise = torch.randn(a.shape, generator=g, device=self.device) * self.cfg.expl_noise
                a = (a + noise).clamp(-1.0, 1.0) * self.actor.dim_mask
        return ActOut(env_action=self.actor.to_env(a), action=a)

    # ------------------------------------------------------------------ critic helpers
    def critic_x(self, state: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        return state if self.cfg.critic_input == "state" else obs.flatten(-2)

    def encode(self, action: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Stored actions ``[B, N]`` long / ``[B, N, A]`` float -> critic encoding ``[B, N, A]``."""
        if self.spec.discrete:
            action = nn.functional.one_hot(action.long(), self.spec.act_dim).float()
        return action * active.unsqueeze(-1).float()

    def q_values(self, critic: nn.Module, x: torch.Tensor, joint: torch.Tensor,
                 critics: Sequence[int] | None = None) -> torch.Tensor:
        """Outputs ``[B, K]`` of the critics ``critics`` (default: all ``K = n_critics``). ``joint``:
        ``[B, N, A]`` (the same for every critic) or ``[B, K, N, A]`` (one joint action per critic, e.g.
        MADDPG's own-action substitution)."""
        return critic(self.critic_inputs(x, joint, critics), critics).squeeze(-1)

    def critic_inputs(self, x: torch.Tensor, joint: torch.Tensor, critics: Sequence[int] | None = None
                      ) -> torch.Tensor:
        """The critics' input ``[B, K, x_dim + N A]`` for :meth:`q_values` (arguments as there)."""
        k = self.n_critics() if critics is None else len(critics)
        if joint.dim() == 3:
            joint = joint.unsqueeze(1).expand(-1, k, -1, -1)
        return torch.cat([x.unsqueeze(1).expand(-1, k, -1), joint.flatten(-2)], -1)

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
        inp = self.critic_inputs(x, self.encode(batch.action, batch.active))
        # Without a graph (nets.manual) the loss's gradient dL/dq = 2 (q - y) w / sum(w) goes back by hand.
        out, tape = manual.forward(self.critic, inp) if self.manual_grads else (self.critic(inp), None)
        q = out.squeeze(-1)
        diff = q - y
        w = torch.ones_like(q) if weight is None else weight
        denom = w.sum(0).clamp_min(1.0)
        loss = ((diff.pow(2) * w).sum(0) / denom).sum()
        backward = None if tape is None else (
            lambda: manual.backward(tape, (diff * w * (2.0 / denom)).unsqueeze(-1)))
        norm = self.step_optimizer(self.opts["critic"], loss, self.critic_params, "the critic loss", backward)
        return {"loss/critic": loss.detach() / q.shape[1], "train/q": q.detach().mean(), "train/target": y.mean(),
                "train/grad_norm_critic": norm}

    def critic_grad(self, on: bool) -> None:
        """Actor steps differentiate through the critic's input only; skip its parameter gradients."""
        for p in self.critic_params:
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
            params, what = self.actor_params[0 if self.cfg.share_params else i], f"the actor loss of agent {i}"
            if self.manual_grads:
                losses.append(self.manual_agent_step(batch, x, joint, i, critic_index, params, what))
            else:
                w = batch.active[:, i].float()
                a_i = self.actor.squash(self.actor(batch.obs[:, [i]], [i]), [i]) * act[:, [i]]
                cand = torch.cat([joint[:, :i], a_i, joint[:, i + 1:]], 1)
                # Only the critic the actors ascend is evaluated (HATD3's twin Q_2 would double the cost).
                q = self.q_values(self.critic, x, cand, [critic_index])[:, 0]
                loss = -(q * w).sum() / w.sum().clamp_min(1.0)
                self.step_optimizer(self.actor_opt(i), loss, params, what)
                losses.append(loss.detach())
            with torch.no_grad():  # later agents see this agent's updated action
                joint[:, i] = self.actor.squash(self.actor(batch.obs[:, [i]], [i]), [i])[:, 0] * act[:, i]
        self.critic_grad(True)
        self.last_order = plan.critical
        return {"loss/actor": torch.stack(losses).mean()}

    def manual_agent_step(self, batch: TransitionBatch, x: torch.Tensor, joint: torch.Tensor, i: int,
                          critic_index: int, params: list[nn.Parameter], what: str) -> torch.Tensor:
        """:meth:`sequential_actor_update`'s step of agent ``i`` with hand-written backward passes
        (:mod:`pamarl.nets.manual`): ``dL/dq = -w / sum(w)`` through the frozen critic to agent ``i``'s
        action, through ``tanh`` and into the actor's parameters. Returns the loss."""
        act_i = batch.active[:, [i]].float().unsqueeze(-1)
        pre, actor_tape = manual.forward(self.actor.body, batch.obs[:, [i]], [i])
        a_i = self.actor.squash(pre, [i]) * act_i
        cand = torch.cat([joint[:, :i], a_i, joint[:, i + 1:]], 1)
        q, critic_tape = manual.forward(self.critic, self.critic_inputs(x, cand, [critic_index]), [critic_index])
        w = batch.active[:, i].float()
        denom = w.sum().clamp_min(1.0)
        loss = -(q[:, 0, 0] * w).sum() / denom

        def backward() -> None:
            a = self.spec.act_dim
            cols = x.shape[-1] + i * a + torch.arange(a, device=x.device).view(1, a)  # agent i's action columns
            d_a = manual.backward(critic_tape, (-w / denom).view(-1, 1, 1), input_grad=True, param_grad=False,
                                  input_cols=cols)  # dL/d a_i [B, 1, A]
            assert d_a is not None
            manual.backward(actor_tape, self.actor.squash_backward(pre, d_a * act_i, [i]))

        self.step_optimizer(self.actor_opt(i), loss, params, what, backward)
        return loss

    def update(self, progress: Progress) -> Metrics:
        metrics = super().update(progress)
        order = getattr(self, "last_order", None)
        if order is not None:
            metrics["sched/order"] = ";".join(str(i) for i in order)
        return metrics
