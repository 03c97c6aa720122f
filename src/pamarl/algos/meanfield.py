"""What the mean-field family (Yang et al. 2018, "Mean Field Multi-Agent Reinforcement Learning",
arXiv 1802.05438) shares: the mean action, Boltzmann policies, the mean-field value and target.

Mean action (eq. 6). Agent ``j``'s mean action is the average one-hot action of its neighbours,
*alive and excluding itself*: ``mean_a^j = 1/N^j sum_{k in N(j), k != j} onehot(a^k)``. Agents act
simultaneously, so the mean action an agent conditions on at step ``t`` is built from its neighbours'
actions at ``t - 1`` (as in the authors' code); at the first step of an episode, or with no neighbour,
it is the uniform distribution. Neighbourhoods:

* ``team`` -- every other alive agent of the team (what the authors' battle code does);
* ``radius`` -- agents within Chebyshev distance ``radius`` on the map grid, computed in O(E * (N + A * G^2)):
  scatter the one-hot actions onto the grid, box-sum them with a summed-area table, gather at each agent
  and subtract its own action. No N x N matrix is ever formed. Needs an env with grid positions
  (:class:`pamarl.envs.base.ObsLayout` with ``grid``).

Boltzmann policy (eq. 12): ``pi(a | s, mean_a) = exp(Q(s, a, mean_a) / T) / sum_b exp(Q(s, b, mean_a) / T)``
with temperature ``T = 1 / beta``. (The seed notes print ``exp(-beta Q)``; with rewards to maximise the sign
is ``+``, as in the authors' code.) Mean-field value (eq. 10): ``v^MF(s') = sum_a pi(a | s', mean_a') Q^-(s', a,
mean_a')``; target (eqs. 9, 11): ``y = r + gamma (1 - done) v^MF(s')``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from pamarl.envs.base import BatchObs, BatchStep, EnvSpec
from pamarl.errors import UsageError
from pamarl.nets.qnets import masked_logits


# ====================================================================== configuration
@dataclass
class MeanFieldNetConfig:
    """What MF-Q/IL and MF-AC/AC configure alike: the authors' optimiser settings, the neighbourhood of the
    mean action and the team-shared network (listed first among a config's bases, so its defaults win)."""

    lr: float = 1e-4
    """Adam learning rate (the authors' 1e-4)."""
    gamma: float = 0.95
    """Discount factor (the authors' 0.95)."""
    neighbourhood: str = "team"
    """Whose actions make the mean action: 'team' (all other alive agents) or 'radius' (within ``radius``)."""
    radius: int = 6
    """Chebyshev radius in grid cells of neighbourhood=radius."""
    conv_channels: tuple[int, ...] = (32, 32)
    """3x3 conv layers of the view encoder (grid tasks)."""
    embed: int = 128
    """Width of the observation embedding."""
    mean_embed: int = 64
    """Width of the mean-action embedding."""
    hidden: tuple[int, ...] = (64,)
    """Hidden layers of the heads on [observation embedding, mean-action embedding]."""

    def check_neighbourhood(self) -> None:
        if self.neighbourhood not in ("team", "radius") or self.radius < 0:
            raise UsageError(f"neighbourhood must be 'team' or 'radius' (radius >= 0), got {self.neighbourhood!r}")


# ====================================================================== pure functions
def uniform_like(counts: torch.Tensor, n_actions: int) -> torch.Tensor:
    return torch.full((*counts.shape, n_actions), 1.0 / n_actions, device=counts.device)


def mean_action_team(actions: torch.Tensor, alive: torch.Tensor, n_actions: int) -> torch.Tensor:
    """``[E, N] long, [E, N] bool -> [E, N, A]``: mean one-hot action of the other alive agents."""
    oh = F.one_hot(actions.clamp_min(0), n_actions).float() * alive.unsqueeze(-1)
    others = oh.sum(1, keepdim=True) - oh
    count = alive.sum(1, keepdim=True) - alive.long()
    mean = others / count.clamp_min(1).unsqueeze(-1)
    return torch.where((count > 0).unsqueeze(-1), mean, uniform_like(count, n_actions))


def box_sum(board: torch.Tensor, radius: int) -> torch.Tensor:
    """``[E, K, G, G] -> [E, K, G, G]``: sum over the ``(2r+1)^2`` window around each cell (clipped at the
    map's edge), by a summed-area table: O(G^2) whatever the radius."""
    G = board.shape[-1]
    s = F.pad(board, (1, 0, 1, 0)).cumsum(-1).cumsum(-2)  # s[y, x] = sum of board[:y, :x]
    lo = (torch.arange(G, device=board.device) - radius).clamp(0, G)
    hi = (torch.arange(G, device=board.device) + radius + 1).clamp(0, G)
    rows_hi, rows_lo = s[..., hi, :], s[..., lo, :]
    return rows_hi[..., hi] - rows_hi[..., lo] - rows_lo[..., hi] + rows_lo[..., lo]


def mean_action_radius(actions: torch.Tensor, alive: torch.Tensor, pos: torch.Tensor, n_actions: int, grid: int,
                       radius: int) -> torch.Tensor:
    """``[E, N]``, ``[E, N]``, ``[E, N, 2]`` long (x, y) -> ``[E, N, A]``: mean one-hot action of the other
    alive agents within Chebyshev distance ``radius``; uniform where there is none."""
    E, N = actions.shape
    oh = F.one_hot(actions.clamp_min(0), n_actions).float() * alive.unsqueeze(-1)
    feats = torch.cat([oh, alive.float().unsqueeze(-1)], -1)  # last channel counts agents
    p = pos.long().clamp(0, grid - 1)
    cell = (p[..., 1] * grid + p[..., 0]).unsqueeze(-1).expand(E, N, n_actions + 1)
    board = torch.zeros(E, grid * grid, n_actions + 1, device=actions.device)
    board.scatter_add_(1, cell, feats)
    summed = box_sum(board.transpose(1, 2).reshape(E, n_actions + 1, grid, grid), radius)
    near = summed.reshape(E, n_actions + 1, grid * grid).transpose(1, 2).gather(1, cell) - feats
    count = near[..., -1].round()
    mean = near[..., :-1] / count.clamp_min(1).unsqueeze(-1)
    return torch.where((count > 0).unsqueeze(-1), mean, uniform_like(count, n_actions))


def boltzmann(q: torch.Tensor, temperature: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 12: ``softmax(Q / T)`` over the allowed actions."""
    logits = q / max(float(temperature), 1e-8)
    if mask is not None:
        logits = masked_logits(logits, mask)
    return torch.softmax(logits, -1)


def mf_value(probs: torch.Tensor, q_target: torch.Tensor) -> torch.Tensor:
    """Eq. 10: ``v^MF(s') = sum_a pi(a | s', mean_a') Q^-(s', a, mean_a')``."""
    return (probs * q_target).sum(-1)


def mf_target(reward: torch.Tensor, done: torch.Tensor, value: torch.Tensor, gamma: float) -> torch.Tensor:
    """Eqs. 9/11: ``y = r + gamma (1 - done) v^MF(s')`` (``done``: the agent died or the episode terminated)."""
    return reward + gamma * (1.0 - done) * value


# ====================================================================== acting state
class MeanActionTracker:
    """Remembers each env copy's previous actions (per acting stream: training / evaluation) and builds
    the mean action the agents condition on; ``obs.first`` marks where an episode starts (uniform there)."""

    def __init__(self, spec: EnvSpec, mode: str, radius: int):
        if mode not in ("team", "radius"):
            raise UsageError(f"neighbourhood must be 'team' or 'radius', got {mode!r}")
        lay = spec.obs_layout
        if mode == "radius" and (lay is None or lay.grid <= 0):
            raise UsageError("neighbourhood=radius needs grid positions in the observation (MAgent2 tasks); "
                             "use neighbourhood=team on this task")
        self.spec, self.mode, self.radius = spec, mode, int(radius)
        self.n_actions = spec.act_dim
        self.prev: dict[bool, tuple[torch.Tensor, torch.Tensor] | None] = {True: None, False: None}

    def positions(self, obs: torch.Tensor) -> torch.Tensor:
        lay = self.spec.obs_layout
        assert lay is not None
        return (obs[..., -2:] * lay.grid).round().long()

    def mean(self, actions: torch.Tensor, acted: torch.Tensor, now: BatchObs) -> torch.Tensor:
        """Mean action at ``now`` of the agents that took ``actions`` (``acted``) and are alive at ``now``."""
        alive = acted & now.active.to(acted.device)
        if self.mode == "team":
            return mean_action_team(actions, alive, self.n_actions)
        lay = self.spec.obs_layout
        assert lay is not None
        return mean_action_radius(actions, alive, self.positions(now.obs.to(actions.device)), self.n_actions,
                                  lay.grid, self.radius)

    def current(self, obs: BatchObs, train: bool, device: torch.device) -> torch.Tensor:
        """The mean action each agent conditions on now (``[E, N, A]``); ``train``: the training stream (else
        the evaluation's, which has its own env copies)."""
        E, N = obs.active.shape
        prev = self.prev[train]
        first = obs.first.to(device)
        if prev is None or prev[0].shape != (E, N):
            return uniform_like(torch.zeros(E, N, device=device), self.n_actions)
        m = self.mean(prev[0], prev[1], obs)
        return torch.where(first.view(E, 1, 1), uniform_like(m[..., 0], self.n_actions), m)

    def record(self, actions: torch.Tensor, obs: BatchObs, train: bool) -> None:
        self.prev[train] = (actions, obs.active.to(actions.device))

    def reset(self) -> None:
        self.prev = {True: None, False: None}


def agent_rows(obs: BatchObs, action: torch.Tensor, mean: torch.Tensor | None, step: BatchStep,
               tracker: MeanActionTracker | None, device: torch.device) -> dict[str, torch.Tensor]:
    """One row per agent alive at ``t``: ``(o, a, mean_a, r, o', mean_a', done)``.

    ``done`` is 1 where the episode terminated or the agent died during the step (it is active at ``t`` and
    not in ``final``): such transitions are stored and do not bootstrap. ``mean_a'`` is the mean action at
    ``s'`` of the actions just taken, over the neighbours alive at ``s'``.
    """
    act = obs.active.to(device)
    fin = step.final
    fin_active = fin.active.to(device)
    done = step.terminated.to(device).unsqueeze(-1) | (act & ~fin_active)
    E, N = act.shape
    rows = {"obs": obs.obs.to(device)[act], "next_obs": fin.obs.to(device)[act], "action": action.to(device)[act],
            "reward": step.reward.to(device, torch.float32)[act], "done": done[act].float(),
            "next_mask": fin.action_mask.to(device)[act]}
    if tracker is not None and mean is not None:
        rows["mean"] = mean[act]
        rows["next_mean"] = tracker.mean(action.to(device), act, fin)[act]
    else:
        rows["mean"] = rows["next_mean"] = torch.zeros(int(act.sum()), 0, device=device)
    return rows
