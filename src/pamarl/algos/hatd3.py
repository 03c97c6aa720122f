"""HATD3: heterogeneous-agent TD3, HADDPG with TD3's three fixes.

Zhong, Kuba et al. 2024, "Heterogeneous-Agent Reinforcement Learning" (JMLR), section 3.5, applying
Fujimoto et al. 2018, "Addressing Function Approximation Error in Actor-Critic Methods" (TD3) to the
HAML template of :mod:`pamarl.algos.haddpg`:

* clipped double Q (TD3 eq. 10): twin joint critics, target ``y = r + gamma * (1 - d) * min_k Q_k^-(s', a~')``;
* target policy smoothing (TD3 eq. 14): ``a~' = clip(mu^-(o') + clip(N(0, policy_noise), -noise_clip,
  noise_clip), -1, 1)`` per agent and dimension;
* delayed policy updates (TD3 section 5.1): the actors (sequentially, in a random order, maximising
  ``Q_1``) and all target networks are updated once every ``policy_delay`` critic updates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pamarl.algos.actor_critic import ActorCriticConfig
from pamarl.algos.haddpg import HADDPG
from pamarl.algos.registry import register
from pamarl.buffers.replay import TransitionBatch
from pamarl.errors import UsageError


@dataclass
class HATD3Config(ActorCriticConfig):
    """HATD3's hyperparameters (TD3's defaults)."""

    policy_noise: float = 0.2
    """Std of the target policy smoothing noise (in [-1, 1] action units)."""
    noise_clip: float = 0.5
    """Clip of the target policy smoothing noise."""
    policy_delay: int = 2
    """Critic updates per actor (and target) update."""

    def validate(self) -> None:
        super().validate()
        if self.policy_delay < 1 or self.policy_noise < 0 or self.noise_clip < 0:
            raise UsageError("policy_delay must be >= 1 and policy_noise, noise_clip >= 0")


@register
class HATD3(HADDPG):
    """Twin team critics, smoothed targets, delayed sequential actor updates."""

    name = "hatd3"
    Config = HATD3Config
    paper = "Zhong et al. 2024, Heterogeneous-Agent Reinforcement Learning (JMLR)"
    cfg: HATD3Config
    sync_every_step = False  # targets move only with the delayed actor update (TD3)

    def n_critics(self) -> int:
        return 2

    def next_actions(self, batch: TransitionBatch) -> torch.Tensor:
        a = self.target_actions(batch.next_obs, batch.next_action_mask, batch.next_active)
        c = self.cfg
        noise = torch.randn(a.shape, generator=self.generator, device=a.device) * c.policy_noise
        a = (a + noise.clamp(-c.noise_clip, c.noise_clip)).clamp(-1.0, 1.0)
        return a * self.actor.dim_mask * batch.next_active.unsqueeze(-1).float()

    def next_value(self, q_next: torch.Tensor) -> torch.Tensor:
        return q_next.min(-1).values

    def actor_due(self) -> bool:
        # self.updates counts the gradient steps finished before this one.
        return (self.updates + 1) % self.cfg.policy_delay == 0
