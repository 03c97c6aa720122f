"""On-policy value critics and their clipped loss (MAPPO's value clipping and value normalisation)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from pamarl.algos.common import masked_mean
from pamarl.buffers.rollout import ValueNorm
from pamarl.envs.base import EnvSpec
from pamarl.nets.mlp import AgentMLP

if TYPE_CHECKING:
    from pamarl.algos.onpolicy import OnPolicyConfig


def value_loss(new: torch.Tensor, old: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
               clip: float, huber_delta: float) -> torch.Tensor:
    """Per-agent critic loss ``[k]``: clipped Huber or squared error (MAPPO, Yu et al. 2022, appendix eq. 3).

    ``new``, ``old`` and ``target`` must be in the same units (the critic's training units): ``old`` is
    what the critic predicted when the sample was collected, so at the first critic step of an update,
    where ``new == old``, no sample is frozen by the clip.
    """

    def err(v: torch.Tensor) -> torch.Tensor:  # of the error target - v (Huber depends on |target - v| only)
        if huber_delta > 0:
            return nn.functional.huber_loss(v, target, reduction="none", delta=huber_delta)
        return 0.5 * (target - v).pow(2)

    loss = err(new)
    if clip > 0:
        clipped = old + (new - old).clamp(-clip, clip)
        loss = torch.max(loss, err(clipped))
    return masked_mean(loss, mask)


class Critics(nn.Module):
    """Value functions over the chosen input, with optional target normalisation.

    Per agent (``V_i``, ``critic=per_agent``) or one shared centralised ``V(s)`` (``critic=shared``,
    HARL's critic), whose single output is broadcast to every agent's column so that the rest of the
    update is the same for both.
    """

    def __init__(self, spec: EnvSpec, cfg: OnPolicyConfig, shared: bool):
        super().__init__()
        self.mode = cfg.critic_input
        self.shared = shared
        in_dim = {"state": spec.state_dim, "obs": spec.obs_dim, "state+obs": spec.state_dim + spec.obs_dim}[self.mode]
        self.n_agents = spec.n_agents
        self.n_out = 1 if self.shared else spec.n_agents
        self.net = AgentMLP(self.n_out, in_dim, 1, cfg.hidden, cfg.activation, cfg.share_params and not self.shared,
                            cfg.agent_id, input_norm=cfg.input_norm, layer_norm=cfg.layer_norm)
        self.norm = ValueNorm(self.n_out) if cfg.value_norm else None

    def inputs(self, state: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        if self.shared:
            return state.unsqueeze(-2)
        if self.mode == "obs":
            return obs
        s = state.unsqueeze(-2).expand(*obs.shape[:-1], state.shape[-1])
        return s if self.mode == "state" else torch.cat([s, obs], -1)

    def raw(self, state: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """Critic outputs ``[B, N]`` in its training units (normalised when ``value_norm``)."""
        out = self.outputs(state, obs)
        return out.expand(*out.shape[:-1], self.n_agents) if self.shared else out

    def outputs(self, state: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """The networks' own outputs ``[B, n_out]`` in training units: one column for a shared critic."""
        return self.net(self.inputs(state, obs)).squeeze(-1)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Reward units ``[B, N]`` -> training units."""
        return x if self.norm is None else self.norm.normalize(x)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Training units ``[B, N]`` -> reward units."""
        return x if self.norm is None else self.norm.denormalize(x)

    def groups(self, share_params: bool) -> int:
        """Optimiser groups: one per agent, or one for a shared or parameter-shared critic."""
        return 1 if (self.shared or share_params) else self.n_agents

    def value(self, state: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """Value estimates ``[B, N]`` in reward units."""
        return self.denormalize(self.raw(state, obs))
