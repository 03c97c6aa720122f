"""MADDPG: deterministic actors with one centralised critic per agent.

Lowe et al. 2017, "Multi-Agent Actor-Critic for Mixed Cooperative-Competitive Environments".
Agent ``i`` has a deterministic policy ``mu_i(o_i)`` and a critic ``Q_i(x, a_1, ..., a_N)`` over the
global state ``x`` (or all observations, ``critic_input=obs``) and the joint action:

* critic (their eq. 6): ``L(phi_i) = E[(Q_i(x, a) - y_i)^2]``,
  ``y_i = r_i + gamma * (1 - d) * Q_i^-(x', mu_1^-(o_1'), ..., mu_N^-(o_N'))``;
* actor (their eq. 5): ``max E[Q_i(x, a_1, ..., mu_i(o_i), ..., a_N)]`` with the other agents' actions
  taken from the replay.

Discrete actions use the Gumbel-softmax relaxation (their section 4.2; Jang et al. 2017): the actor's
action in the critic is a straight-through one-hot sample of ``softmax((logits + g) / gumbel_tau)``,
behaviour samples the same distribution, target actions are the target actor's greedy one-hot, and
evaluation is greedy. A small penalty on the squared pre-activations (as in the authors' code) keeps the
logits, and the tanh of continuous actors, out of saturation. Continuous actors output ``tanh`` in
[-1, 1], mapped into the env's bounds, with Gaussian exploration noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pamarl.algos.actor_critic import ActorCriticAlgorithm, ActorCriticConfig
from pamarl.algos.common import check_finite, clip_and_step_together
from pamarl.algos.offpolicy import td_target
from pamarl.algos.registry import register
from pamarl.buffers.replay import TransitionBatch
from pamarl.errors import UsageError
from pamarl.nets import manual
from pamarl.nets.qnets import gumbel_softmax, gumbel_softmax_backward, gumbel_softmax_parts, masked_logits


@dataclass
class MADDPGConfig(ActorCriticConfig):
    """MADDPG's hyperparameters."""

    gumbel_tau: float = 1.0
    """Temperature of the Gumbel-softmax relaxation (discrete actions)."""
    actor_reg: float = 1e-3
    """Weight of the penalty on the actors' squared pre-activations."""
    share_critic: bool = False
    """With share_params, also share one critic (with an agent id) among the agents."""

    def validate(self) -> None:
        super().validate()
        if self.gumbel_tau <= 0:
            raise UsageError(f"gumbel_tau must be > 0, got {self.gumbel_tau}")


@register
class MADDPG(ActorCriticAlgorithm):
    """Per-agent centralised critics, all actors updated together from replayed joint actions."""

    name = "maddpg"
    Config = MADDPGConfig
    paper = "Lowe et al. 2017, Multi-Agent Actor-Critic for Mixed Cooperative-Competitive Environments"
    cfg: MADDPGConfig

    def n_critics(self) -> int:
        return self.n

    def critic_shared(self) -> bool:
        return self.cfg.share_params and self.cfg.share_critic

    def train_step(self, batch: TransitionBatch) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            a_next = self.target_actions(batch.next_obs, batch.next_action_mask, batch.next_active)
            q_next = self.q_values(self.target_critic, self.critic_x(batch.next_state, batch.next_obs), a_next)
            y = td_target(batch.reward, batch.terminated, q_next, batch.discount)  # per-agent rewards r_i
        metrics = self.critic_update(batch, y, weight=batch.active.float())
        metrics.update(self.actor_update(batch))
        return metrics

    def actor_update(self, batch: TransitionBatch) -> dict[str, torch.Tensor]:
        """Every actor ascends its own critic at once (eq. 5), in one batched pass."""
        if self.manual_grads:
            return self.manual_actor_update(batch)
        cfg = self.cfg
        active = batch.active.float()
        pre = self.actor(batch.obs)  # [B, N, A]
        if self.spec.discrete:
            mine = gumbel_softmax(masked_logits(pre, batch.action_mask), cfg.gumbel_tau, self.generator)
        else:
            mine = self.actor.squash(pre)
        joint = self.own_action_joint(batch, mine * active.unsqueeze(-1))
        self.critic_grad(False)
        q = self.q_values(self.critic, self.critic_x(batch.state, batch.obs), joint)  # [B, N]
        self.critic_grad(True)
        per_agent = -(q * active).sum(0) / active.sum(0).clamp_min(1.0)
        reg = cfg.actor_reg * (pre.pow(2) * self.actor.dim_mask).mean((0, 2))
        loss_i = per_agent + reg
        # Separate actors: summing gives each its own gradient. A shared actor takes the mean.
        loss = loss_i.mean() if cfg.share_params else loss_i.sum()
        check_finite(loss, "the actor loss")
        for o in self.actor_opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        # Every actor steps now: per-agent clipping, then one optimiser kernel for all of them.
        clip_and_step_together(self.actor_opts, self.actor_params, cfg.max_grad_norm)
        return {"loss/actor": per_agent.detach().mean()}

    def own_action_joint(self, batch: TransitionBatch, mine: torch.Tensor) -> torch.Tensor:
        """The joint actions ``[B, N (critic), N (agent), A]`` of eq. 5: critic ``i`` sees agent ``i``'s fresh action
        ``mine [B, N, A]`` and the replayed actions of the others (off-diagonal terms carry no gradient)."""
        replayed = self.encode(batch.action, batch.active)  # [B, N, A]
        eye = torch.eye(self.n, device=mine.device).unsqueeze(-1)  # [N (critic), N (agent), 1]
        return replayed.unsqueeze(1) * (1 - eye) + mine.unsqueeze(1) * eye

    @torch.no_grad()
    def manual_actor_update(self, batch: TransitionBatch) -> dict[str, torch.Tensor]:
        """:meth:`actor_update` with hand-written backward passes (:mod:`pamarl.nets.manual`), the same loss.

        ``dL/dq_i = -s active_i / sum(active_i)`` (``s`` = 1, or 1/N for a shared actor's mean) goes back
        through the frozen critics to their inputs; critic ``i``'s gradient at agent ``i``'s action columns
        is ``dL/d mine_i``, which goes through the Gumbel-softmax (or tanh) to the logits; add the
        penalty's ``2 c s pre mask / (B A)`` and the actors' backward does the rest.
        """
        cfg, n, a_dim = self.cfg, self.n, self.spec.act_dim
        active = batch.active.float()
        act = active.unsqueeze(-1)
        pre, actor_tape = manual.forward(self.actor.body, batch.obs)  # [B, N, A]
        soft = None
        if self.spec.discrete:
            hard, soft = gumbel_softmax_parts(masked_logits(pre, batch.action_mask), cfg.gumbel_tau, self.generator)
            mine = hard - soft + soft  # the straight-through sample's value, as gumbel_softmax computes it
        else:
            mine = self.actor.squash(pre)
        joint = self.own_action_joint(batch, mine * act)
        x = self.critic_x(batch.state, batch.obs)
        q, critic_tape = manual.forward(self.critic, self.critic_inputs(x, joint))
        q = q.squeeze(-1)  # [B, N]
        count = active.sum(0).clamp_min(1.0)
        per_agent = -(q * active).sum(0) / count
        masked_sq = pre.square() * self.actor.dim_mask
        reg = cfg.actor_reg * masked_sq.mean((0, 2))
        scale = 1.0 / n if cfg.share_params else 1.0
        loss = scale * (per_agent + reg).sum()
        check_finite(loss, "the actor loss")
        # Critic i's input columns of agent i's action, [N, A]: the only input gradient the actors need.
        cols = x.shape[-1] + torch.arange(n * a_dim, device=x.device).view(n, a_dim)
        d_mine = manual.backward(critic_tape, (-scale * active / count).unsqueeze(-1), input_grad=True,
                                 param_grad=False, input_cols=cols)  # [B, N, A]
        assert d_mine is not None
        d_mine = d_mine * act
        if soft is not None:
            # masked_logits passes no gradient to the forbidden actions it overwrote; their soft is exactly 0
            # (exp of -1e9), so the softmax's Jacobian gives them 0 already.
            d_pre = gumbel_softmax_backward(soft, d_mine, cfg.gumbel_tau)
        else:
            d_pre = self.actor.squash_backward(pre, d_mine)
        d_pre += pre * self.actor.dim_mask * (2 * scale * cfg.actor_reg / (pre.shape[0] * a_dim))
        for o in self.actor_opts:
            o.zero_grad(set_to_none=True)
        manual.backward(actor_tape, d_pre)
        clip_and_step_together(self.actor_opts, self.actor_params, cfg.max_grad_norm)
        return {"loss/actor": per_agent.mean()}
