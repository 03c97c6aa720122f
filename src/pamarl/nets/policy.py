"""Stochastic per-agent policies: masked categorical (discrete) and diagonal Gaussian (continuous).

Continuous policies act in a normalised space: the Gaussian sample ``u`` is stored as the action,
and the env receives ``low + (g(u) + 1) / 2 * (high - low)`` with ``g`` = clip to [-1, 1]
(``squash="clip"``) or ``tanh`` (``squash="tanh"``). Either map is part of the environment from the
policy's point of view: the probability ratio pi_new(u)/pi_old(u) is exact, since a tanh's Jacobian
does not depend on the parameters and cancels in the ratio. Padded action dimensions of narrower
agents are left out of log-probabilities and entropies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from pamarl.envs.base import EnvSpec
from pamarl.nets.mlp import AgentMLP

_LOG_2PI = math.log(2 * math.pi)


def log_softmax_last(x: torch.Tensor) -> torch.Tensor:
    """``log_softmax(x, -1)``, computed on the permuted view with the actions first.

    ATen's CPU kernel reduces a short last dimension (a handful of actions) row by row; over the first
    dimension it vectorises across rows. Same values, 4-5x faster on ``[3,200, 1, 5]`` (forward 22 us against
    112 us, forward and backward 86 us against 214 us, 2 threads, measured). The result is a view with
    ``x``'s shape.
    """
    dims = list(range(x.dim()))
    to_front = [dims[-1], *dims[:-1]]
    back = [*range(1, x.dim()), 0]
    return torch.log_softmax(x.permute(to_front), 0).permute(back)


class Actor(nn.Module):
    """All agents' policies pi_i(a_i | o_i), evaluated together over any subset of agents."""

    # Buffers registered in __init__ (declared here so the type checker sees tensors, not Module | Tensor).
    dim_mask: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor

    def __init__(
        self,
        spec: EnvSpec,
        hidden: Sequence[int] = (128, 128),
        activation: str = "relu",
        shared: bool = False,
        agent_id: bool = False,
        log_std_init: float = -0.5,
        state_dependent_std: bool = False,
        squash: str = "clip",
        input_norm: bool = False,
        layer_norm: bool = False,
    ):
        super().__init__()
        if squash not in ("clip", "tanh"):
            raise ValueError(f"squash must be 'clip' or 'tanh', got {squash!r}")
        self.n_agents = spec.n_agents
        self.discrete = spec.discrete
        self.act_dim = spec.act_dim
        self.shared = shared
        self.state_dependent_std = state_dependent_std and not spec.discrete
        self.squash = squash
        out = spec.act_dim * (2 if self.state_dependent_std else 1)
        self.body = AgentMLP(spec.n_agents, spec.obs_dim, out, hidden, activation, shared, agent_id, out_gain=0.01,
                             input_norm=input_norm, layer_norm=layer_norm)
        if not spec.discrete and not self.state_dependent_std:
            n = 1 if shared else spec.n_agents
            self.log_std = nn.ParameterList(
                nn.Parameter(torch.full((spec.act_dim,), float(log_std_init))) for _ in range(n)
            )
        low, high = spec.padded_bounds()
        self.register_buffer("dim_mask", torch.as_tensor(spec.action_dim_mask(), dtype=torch.float32))
        self.register_buffer("low", torch.as_tensor(low))
        self.register_buffer("high", torch.as_tensor(high))
        self.log_std_init = log_std_init

    def agent_parameters(self, i: int) -> list[nn.Parameter]:
        params = self.body.agent_parameters(i)
        if hasattr(self, "log_std"):
            params.append(self.log_std[0 if self.shared else i])
        return params

    def _idx(self, agents: Sequence[int] | None) -> list[int]:
        return list(range(self.n_agents)) if agents is None else list(agents)

    def _gaussian(self, out: torch.Tensor, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.state_dependent_std:
            mean, log_std = out.chunk(2, -1)
            log_std = log_std.clamp(-5.0, 2.0) + self.log_std_init
        else:
            stds = [self.log_std[0 if self.shared else i] for i in idx]
            log_std = torch.stack(stds).expand_as(out)
            mean = out
        return mean, log_std

    def _logits(self, out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return out.masked_fill(~mask, -1e9)

    @torch.no_grad()
    def act(
        self,
        obs: torch.Tensor,
        mask: torch.Tensor,
        generator: torch.Generator | None = None,
        deterministic: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample actions for every agent: ``obs [B, N, obs]`` -> (action, log-prob ``[B, N]``).

        Discrete actions are ``long [B, N]``; continuous are the raw Gaussian samples ``[B, N, D]``
        (use :meth:`to_env` for what the env receives).
        """
        out = self.body(obs)
        if self.discrete:
            logp_all = log_softmax_last(self._logits(out, mask))
            if deterministic:
                a = logp_all.argmax(-1)
            else:
                # Gumbel-max: argmax(logits + Gumbel noise) is a sample of softmax(logits); the uniform noise
                # comes from ``generator``, which lives on the networks' device (no host round trip).
                u = torch.rand(logp_all.shape, generator=generator, device=logp_all.device, dtype=logp_all.dtype)
                a = (logp_all - torch.log(-torch.log(u.clamp_min(1e-20)))).argmax(-1)
            return a, logp_all.gather(-1, a.unsqueeze(-1)).squeeze(-1)
        mean, log_std = self._gaussian(out, self._idx(None))
        if deterministic:
            u = mean
        else:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            u = mean + log_std.exp() * noise
        return u, self._gauss_logp(u, mean, log_std, self.dim_mask)

    @staticmethod
    def _gauss_logp(u: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor, dim_mask: torch.Tensor) -> torch.Tensor:
        z = (u - mean) * torch.exp(-log_std)
        per_dim = -0.5 * z.pow(2) - log_std - 0.5 * _LOG_2PI
        return (per_dim * dim_mask).sum(-1)  # product of per-dimension ratios = exp of this sum

    def evaluate(
        self,
        obs: torch.Tensor,
        mask: torch.Tensor,
        action: torch.Tensor,
        agents: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability and entropy ``[B, k]`` of stored actions for the selected agents.

        ``obs``, ``mask`` and ``action`` hold only the selected agents' slices (``[B, k, ...]``).
        """
        idx = self._idx(agents)
        out = self.body(obs, idx)
        if self.discrete:
            logp_all = log_softmax_last(self._logits(out, mask))
            logp = logp_all.gather(-1, action.long().unsqueeze(-1)).squeeze(-1)
            entropy = -(logp_all.exp() * logp_all).sum(-1)
            return logp, entropy
        mean, log_std = self._gaussian(out, idx)
        dm = self.dim_mask[idx]
        logp = self._gauss_logp(action, mean, log_std, dm)
        entropy = ((0.5 + 0.5 * _LOG_2PI + log_std) * dm).sum(-1)
        return logp, entropy

    def to_env(self, action: torch.Tensor) -> torch.Tensor:
        """What the env receives: discrete ids unchanged; continuous samples mapped into the bounds."""
        if self.discrete:
            return action
        g = action.clamp(-1.0, 1.0) if self.squash == "clip" else torch.tanh(action)
        return self.low + (g + 1.0) * 0.5 * (self.high - self.low)
