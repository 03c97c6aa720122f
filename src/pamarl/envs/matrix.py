"""Cooperative matrix games, natively batched in torch.

Each episode is ``steps`` rounds (default 1) of the same one-shot game; every agent receives the team
payoff. Observations are a constant 1 (so agents that share parameters cannot tell each other apart,
which is what the homogeneity trap is about) followed by the normalised round index when ``steps > 1``.

* ``homogeneity_trap?n=N`` -- HARL paper, Proposition 4: N (even) agents with actions {0, 1}; reward 1
  for the joint actions 0^{N/2} 1^{N/2} and 1^{N/2} 0^{N/2}, else 0. Agents sharing one policy
  reach at most 2 / 2^N in expectation.
* ``climbing`` -- Claus & Boutilier's climbing game, optimum 11 at (0, 0).
* ``penalty?k=-100`` -- the penalty game (Claus & Boutilier), optima 10 at (0, 0) and (2, 2), k at (0, 2) and (2, 0).

The payoff is divided by ``scale`` (default: the largest absolute payoff) so rewards lie in [-1, 1].
"""

from __future__ import annotations

import numpy as np
import torch

from pamarl.envs.base import BatchedEnv, BatchObs, BatchStep, EnvSpec, EpisodeStats
from pamarl.envs.registry import EnvFamily, register_family
from pamarl.errors import UsageError
from pamarl.validation import Rule

CLIMBING = [[11.0, -30.0, 0.0], [-30.0, 7.0, 6.0], [0.0, 0.0, 5.0]]


def penalty_matrix(k: float) -> list[list[float]]:
    return [[10.0, 0.0, k], [0.0, 2.0, 0.0], [k, 0.0, 10.0]]


def homogeneity_trap_payoff(n: int) -> torch.Tensor:
    """Payoff tensor of shape ``[2] * n``: 1 at 0^{n/2}1^{n/2} and 1^{n/2}0^{n/2}, else 0."""
    if n < 2 or n % 2:
        raise UsageError(f"matrix/homogeneity_trap: n must be an even number >= 2, got {n}")
    p = torch.zeros([2] * n)
    h = n // 2
    p[(0,) * h + (1,) * h] = 1.0
    p[(1,) * h + (0,) * h] = 1.0
    return p


class MatrixGame(BatchedEnv):
    """``E`` copies of a cooperative N-player matrix game, stepped as one tensor operation."""

    def __init__(self, payoff: torch.Tensor, num_envs: int, steps: int = 1, scale: float | None = None,
                 name: str = "matrix", device: str = "cpu"):
        payoff = torch.as_tensor(payoff, dtype=torch.float32)
        n = payoff.dim()
        self.num_envs = num_envs
        self.steps = int(steps)
        if self.steps < 1:
            raise UsageError(f"matrix/{name}: steps must be >= 1, got {steps}")
        s = float(scale) if scale is not None else float(payoff.abs().max().clamp_min(1e-8))
        self.payoff = (payoff / s).to(device)
        self.device = torch.device(device)
        obs_dim = 1 + (1 if self.steps > 1 else 0)
        self.spec = EnvSpec(
            agent_ids=tuple(f"agent_{i}" for i in range(n)),
            obs_dims=(obs_dim,) * n,
            state_dim=obs_dim,
            action_kind="discrete",
            action_dims=tuple(int(x) for x in payoff.shape),
            episode_limit=self.steps,
            team_reward=True,
        )
        self._t = torch.zeros(num_envs, dtype=torch.long, device=self.device)
        self._ret = torch.zeros(num_envs, device=self.device)
        self._strides = torch.tensor(
            [int(np.prod(payoff.shape[i + 1 :])) for i in range(n)], dtype=torch.long, device=self.device
        )

    def _obs(self) -> BatchObs:
        e, n = self.num_envs, self.spec.n_agents
        ones = torch.ones(e, 1, device=self.device)
        feat = ones if self.steps == 1 else torch.cat([ones, (self._t.float() / self.steps)[:, None]], 1)
        return BatchObs(
            obs=feat[:, None, :].expand(e, n, feat.shape[1]).clone(),
            state=feat.clone(),
            action_mask=torch.ones(e, n, self.spec.act_dim, dtype=torch.bool, device=self.device),
            active=torch.ones(e, n, dtype=torch.bool, device=self.device),
            first=self._t == 0,  # after a (automatic) reset the step counter is 0; never on a final obs
        )

    def reset(self, seed: int | None = None) -> BatchObs:
        self._t.zero_()
        self._ret.zero_()
        return self._obs()

    def step(self, actions: torch.Tensor) -> BatchStep:
        a = torch.as_tensor(actions, device=self.device).long()
        if a.shape != (self.num_envs, self.spec.n_agents):
            raise UsageError(f"matrix game: actions must be [E, N] = {(self.num_envs, self.spec.n_agents)}, "
                             f"got {tuple(a.shape)}")
        r = self.payoff.reshape(-1)[(a * self._strides).sum(-1)]
        n = self.spec.n_agents
        self._t += 1
        self._ret += r
        final = self._obs()
        done = self._t >= self.steps
        episodes = []
        if bool(done.any()):
            for i in torch.nonzero(done).flatten().tolist():
                ret = float(self._ret[i]) * n  # team return = sum over agents of their (equal) returns
                episodes.append(EpisodeStats(team_return=ret, agent_returns=[ret / n] * n, length=self.steps))
            self._t[done] = 0
            self._ret[done] = 0.0
        return BatchStep(
            next=self._obs(),
            final=final,
            reward=r[:, None].expand(-1, n).clone(),
            cost=None,
            terminated=done.clone(),
            truncated=torch.zeros_like(done),
            episodes=episodes,
        )


def make_matrix(task: str, num_envs: int, seed: int | None = None, device: str = "cpu",
                steps: int = 1, scale: float | None = None, n: int | None = None, k: float = -100.0) -> MatrixGame:
    if task == "homogeneity_trap":
        payoff = homogeneity_trap_payoff(4 if n is None else int(n))
        scale = 1.0 if scale is None else scale
    elif task == "climbing":
        payoff = torch.tensor(CLIMBING)
    elif task == "penalty":
        payoff = torch.tensor(penalty_matrix(float(k)))
    else:
        raise UsageError(f"unknown matrix game {task!r}")
    if n is not None and task != "homogeneity_trap":
        raise UsageError(f"matrix/{task} is a 2-player game; 'n' applies to homogeneity_trap only")
    return MatrixGame(payoff, num_envs=num_envs, steps=steps, scale=scale, name=task, device=device)


register_family(
    EnvFamily(
        name="matrix",
        description="cooperative matrix games, natively batched (team reward scaled to [-1, 1])",
        tasks={
            "homogeneity_trap": "HARL Prop. 4: n agents, reward 1 for 0^{n/2}1^{n/2} or 1^{n/2}0^{n/2}",
            "climbing": "climbing game (optimum 11 at (0,0), scaled by 30)",
            "penalty": "penalty game, k=-100 by default (optima 10 at (0,0) and (2,2); scaled by the largest |payoff|)",
        },
        make_batched=make_matrix,
        params={"steps": Rule(int, ge=1), "scale": Rule(float, gt=0.0, optional=True),
                "n": Rule(int, ge=2, optional=True), "k": Rule(float)},
    )
)
