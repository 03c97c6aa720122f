"""HADDPG: heterogeneous-agent DDPG, a single centralised critic and sequentially updated actors.

Zhong, Kuba et al. 2024, "Heterogeneous-Agent Reinforcement Learning" (JMLR), section 3.5 (HAML
instances: HADDPG, HATD3), built on Lemma 15 / Algorithm 2 (the HAML template): one joint critic
``Q(s, a)`` on the team reward,
``L(phi) = E[(Q(s, a) - (r + gamma * (1 - d) * Q^-(s', mu^-(o'))))^2]``; then, in a random
permutation ``i_1..i_n`` drawn every update, actor ``i_m`` maximises
``E[Q(s, mu_{i_1:m-1}^new(o), mu_{i_m}(o_{i_m}), mu_{i_m+1:n}^old(o))]``, the agents before it acting
with their freshly updated policies. With a zero drift function and no neighbourhood constraint this
is a HAML algorithm, so it inherits monotonic improvement and convergence to a Nash equilibrium in the
exact setting. The order comes from :func:`pamarl.algos.schedules.sequential` -- the same schedule
HAPPO uses -- and the update itself is :meth:`ActorCriticAlgorithm.sequential_actor_update`.
Continuous actions only, as in HARL.
"""

from __future__ import annotations

import torch

from pamarl.algos.actor_critic import ActorCriticAlgorithm, ActorCriticConfig
from pamarl.algos.offpolicy import td_target
from pamarl.algos.registry import register
from pamarl.buffers.replay import TransitionBatch


@register
class HADDPG(ActorCriticAlgorithm):
    """One team critic, deterministic actors updated one after another in a random order."""

    name = "haddpg"
    Config = ActorCriticConfig
    action_kinds = ("continuous",)
    paper = "Zhong et al. 2024, Heterogeneous-Agent Reinforcement Learning (JMLR)"

    def n_critics(self) -> int:
        return 1

    def next_actions(self, batch: TransitionBatch) -> torch.Tensor:
        """Joint successor action for the target: ``mu^-(o')``."""
        return self.target_actions(batch.next_obs, batch.next_action_mask, batch.next_active)

    def next_value(self, q_next: torch.Tensor) -> torch.Tensor:
        """``[B, K] -> [B]``: the single target critic's value."""
        return q_next[:, 0]

    def actor_due(self) -> bool:
        return True

    def train_step(self, batch: TransitionBatch) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            q_next = self.q_values(self.target_critic, self.critic_x(batch.next_state, batch.next_obs),
                                   self.next_actions(batch))
            r = self.team_reward(batch.reward)  # one critic: the summed team reward
            y = td_target(r, batch.terminated, self.next_value(q_next), batch.discount)
        metrics = self.critic_update(batch, y.unsqueeze(-1).expand(-1, self.n_critics()))
        if self.actor_due():
            metrics.update(self.sequential_actor_update(batch, critic_index=0))
            if not self.sync_every_step:
                self.sync_targets()
        return metrics
