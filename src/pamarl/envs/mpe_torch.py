"""Multi-Particle Environments natively batched in torch: ``E`` worlds stepped as a few tensor operations.

Ids: ``mpe-torch/<task>`` with the same task names, parameters and tensors as :mod:`pamarl.envs.mpe`
(``N``, ``local_ratio``, ``max_cycles``, ``continuous``, and for ``simple_tag_v3`` ``prey`` and the
``num_good``/``num_adversaries``/``num_obstacles`` counts), plus ``dtype`` of the world (``float64``, the
default, as mpe2 computes it; or ``float32``: faster on GPUs, but contact forces amplify its rounding past
1e-5 within an episode). Observations and rewards are float32 either way. The physics is mpe2's
``World.step`` (semi-implicit Euler, damping 0.25, softplus contact forces between colliding entities,
speed caps) and each scenario's observation and reward, written once for all copies and all agents;
``tests/test_mpe_torch.py`` checks observations, state, rewards and time limits against the ``mpe/`` family
(mpe2 itself) step for step.

Length: the five scenarios are kept next to the world they share (each is a page of tensor code that
only makes sense with the world's layout).

Differences from ``mpe/`` that the learner never sees: every copy runs on one episode clock (no
supported task ends early, so all copies reset together, every ``max_cycles`` steps), and resets draw
from one torch generator seeded by ``reset(seed)`` rather than one numpy stream per copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from pamarl.envs.base import BatchedEnv, BatchObs, BatchStep, EnvSpec, EpisodeBatch, EpisodeStats
from pamarl.envs.mpe import TASKS as MPE_TASKS
from pamarl.envs.registry import EnvFamily, register_family
from pamarl.errors import UsageError

DT, DAMPING, CONTACT_FORCE, CONTACT_MARGIN = 0.1, 0.25, 100.0, 1e-3  # mpe2 core.World defaults
# Discrete movement actions 0..4 (no-op, -x, +x, -y, +y), as mpe2's SimpleEnv._set_action decodes them.
_MOVES = [[0.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]]


class Scenario:
    """Static layout of one mpe2 scenario plus its observation and reward.

    Every tensor is laid out with the env copy LAST (``apos [A, 2, E]``): each elementwise operation then
    runs over ``E`` contiguous numbers, where ``[E, A, 2]`` would loop over inner dimensions of size 2.
    """

    names: list[str]
    n_team: int  # the learning agents are the first n_team of ``names``
    n_landmarks: int
    dim_c: int = 0
    agent_size: list[float]
    landmark_size: float = 0.05
    agent_collide: bool = False
    landmark_collide: bool = False
    movable: list[bool]
    silent: list[bool]
    accel: list[float]
    max_speed: list[float]  # inf: no cap
    landmark_range: float = 1.0
    team_reward: bool = False
    local_ratio: float | None = None

    def _defaults(self, n: int) -> None:
        self.agent_size = [0.05] * n
        self.movable = [True] * n
        self.silent = [True] * n
        self.accel = [5.0] * n
        self.max_speed = [float("inf")] * n

    def observe(self, w: MPETorch) -> list[torch.Tensor]:
        """Raw observations of every agent, as groups ``[n_g, d_g, E]`` in agent order."""
        raise NotImplementedError

    def reward(self, w: MPETorch) -> torch.Tensor:
        """``[n_team, E]`` rewards after a physics step (the local_ratio mix already applied)."""
        raise NotImplementedError

    def scripted(self, w: MPETorch, obs: list[torch.Tensor]) -> torch.Tensor | None:
        """Actions of the agents outside the team: ``[A - n_team, E]`` (discrete) or ``[A - n_team, 5, E]``."""
        return None


def _others(n: int) -> torch.Tensor:
    """``[n, n-1]``: for each agent, the other agents in world order (how mpe2 lists them)."""
    return torch.tensor([[j for j in range(n) if j != i] for i in range(n)], dtype=torch.long).reshape(n, n - 1)


def _rel(targets: torch.Tensor, apos: torch.Tensor) -> torch.Tensor:
    """``[A, 2 T, E]``: each target's position relative to each agent (``targets [T, 2, E]``)."""
    return (targets[None] - apos[:, None]).reshape(apos.shape[0], -1, apos.shape[-1])


class Simple(Scenario):
    """simple_v3: one agent, one landmark; reward -|p - l|^2; obs [vel, landmark - p]."""

    def __init__(self) -> None:
        self.names, self.n_team, self.n_landmarks = ["agent_0"], 1, 1
        self._defaults(1)
        self.team_reward = True

    def observe(self, w: MPETorch) -> list[torch.Tensor]:
        return [torch.cat([w.vel, w.lpos - w.apos], 1)]

    def reward(self, w: MPETorch) -> torch.Tensor:
        return -((w.apos - w.lpos) ** 2).sum(1)


class Spread(Scenario):
    """simple_spread_v3: N agents cover N landmarks; global -sum_l min_a |a - l|, local -1 per collision."""

    def __init__(self, N: int = 3, local_ratio: float = 0.5) -> None:  # noqa: N803 - mpe2's parameter name
        if int(N) < 2:
            raise UsageError(f"mpe-torch/simple_spread_v3: N must be >= 2, got {N}")
        if not 0.0 <= float(local_ratio) <= 1.0:
            raise UsageError(f"mpe-torch/simple_spread_v3: local_ratio must lie in [0, 1], got {local_ratio}")
        n = int(N)
        self.names, self.n_team, self.n_landmarks, self.dim_c = [f"agent_{i}" for i in range(n)], n, n, 2
        self._defaults(n)
        self.agent_size = [0.15] * n
        self.agent_collide = True
        self.local_ratio = float(local_ratio)
        self.others = _others(n)
        self.not_self = ~torch.eye(n, dtype=torch.bool)[:, :, None]

    def observe(self, w: MPETorch) -> list[torch.Tensor]:
        n, e = self.n_team, w.num_envs
        o = w.const(self.others)
        # The utterances of silent agents are always zero (mpe2 still lists them).
        return [torch.cat([w.vel, w.apos, _rel(w.lpos, w.apos), (w.apos[o] - w.apos[:, None]).reshape(n, -1, e),
                           w.c[o].reshape(n, -1, e)], 1)]

    def reward(self, w: MPETorch) -> torch.Tensor:
        d_al = ((w.apos[:, None] - w.lpos[None]) ** 2).sum(2).sqrt()  # [A, L, E]
        glob = -d_al.min(0).values.sum(0)
        d_aa = ((w.apos[:, None] - w.apos[None]) ** 2).sum(2).sqrt()
        local = -((d_aa < 2 * self.agent_size[0]) & w.const(self.not_self)).sum(1).to(w.dtype)
        lr = float(self.local_ratio or 0.0)
        return glob * (1 - lr) + local * lr


_REF_COLORS = [[0.75, 0.25, 0.25], [0.25, 0.75, 0.25], [0.25, 0.25, 0.75]]
_SL_COLORS = [[0.65, 0.15, 0.15], [0.15, 0.65, 0.15], [0.15, 0.15, 0.65]]


def _goal_pos(w: MPETorch, goal: torch.Tensor) -> torch.Tensor:
    """``[G, 2, E]``: the position of each goal landmark (``goal [G, E]``)."""
    return torch.gather(w.lpos, 0, goal[:, None].expand(-1, 2, -1))


class Reference(Scenario):
    """simple_reference_v3: each agent is told (by the other, dim_c=10) which of 3 landmarks to reach."""

    def __init__(self, local_ratio: float = 0.5) -> None:
        self.names, self.n_team, self.n_landmarks, self.dim_c = ["agent_0", "agent_1"], 2, 3, 10
        self._defaults(2)
        self.silent = [False, False]
        self.local_ratio = float(local_ratio)
        self.colors = torch.tensor(_REF_COLORS).T.contiguous()  # [rgb, landmark]

    def observe(self, w: MPETorch) -> list[torch.Tensor]:
        color = w.const(self.colors)[:, w.goal].transpose(0, 1)  # [2, rgb, E]: the colour of goal_b
        return [torch.cat([w.vel, _rel(w.lpos, w.apos), color, w.c.flip(0)], 1)]

    def reward(self, w: MPETorch) -> torch.Tensor:
        own = -((w.apos.flip(0) - _goal_pos(w, w.goal)) ** 2).sum(1).sqrt()  # goal_a is the other agent
        lr = float(self.local_ratio or 0.0)
        return own.mean(0, keepdim=True) * (1 - lr) + own * lr


class SpeakerListener(Scenario):
    """simple_speaker_listener_v4: an immobile speaker (3 symbols) guides a silent listener."""

    def __init__(self) -> None:
        self.names, self.n_team, self.n_landmarks, self.dim_c = ["speaker_0", "listener_0"], 2, 3, 3
        self._defaults(2)
        self.agent_size = [0.075, 0.075]
        self.landmark_size = 0.04
        self.movable = [False, True]
        self.silent = [False, True]
        self.team_reward = True
        self.colors = torch.tensor(_SL_COLORS).T.contiguous()

    def observe(self, w: MPETorch) -> list[torch.Tensor]:
        speaker = w.const(self.colors)[:, w.goal[:1]].transpose(0, 1)  # [1, rgb, E]
        listener = torch.cat([w.vel[1:], _rel(w.lpos, w.apos[1:]), w.c[:1]], 1)
        return [speaker, listener]

    def reward(self, w: MPETorch) -> torch.Tensor:
        r = -((w.apos[1:] - _goal_pos(w, w.goal[:1])) ** 2).sum(1)
        return r.expand(2, -1)


class Tag(Scenario):
    """simple_tag_v3: the adversaries (learning, first) chase scripted prey among obstacles; +10 per catch."""

    def __init__(self, num_good: int = 1, num_adversaries: int = 3, num_obstacles: int = 2, prey: str = "flee"):
        if prey not in ("flee", "random"):
            raise UsageError(f"mpe-torch/simple_tag_v3: prey must be 'flee' or 'random', got {prey!r}")
        g, a, n_obs = int(num_good), int(num_adversaries), int(num_obstacles)
        if g < 1 or a < 1 or n_obs < 0:
            raise UsageError("mpe-torch/simple_tag_v3: need num_good >= 1, num_adversaries >= 1, num_obstacles >= 0")
        self.names = [f"adversary_{i}" for i in range(a)] + [f"agent_{i}" for i in range(g)]
        self.n_team, self.n_landmarks, self.dim_c, self.n_adv, self.n_good = a, n_obs, 2, a, g
        self._defaults(a + g)
        self.agent_size = [0.075] * a + [0.05] * g
        self.accel = [3.0] * a + [4.0] * g
        self.max_speed = [1.0] * a + [1.3] * g
        self.landmark_size, self.agent_collide, self.landmark_collide, self.landmark_range = 0.2, True, True, 0.9
        self.prey = prey
        self.others = _others(a + g)
        self.others_good = _others(g) if g > 1 else None

    def observe(self, w: MPETorch) -> list[torch.Tensor]:
        e, n, a, g = w.num_envs, self.n_adv + self.n_good, self.n_adv, self.n_good
        o = w.const(self.others)
        base = torch.cat([w.vel, w.apos, _rel(w.lpos, w.apos), (w.apos[o] - w.apos[:, None]).reshape(n, -1, e)], 1)
        good_vel = w.vel[a:]
        adv = torch.cat([base[:a], good_vel.reshape(1, -1, e).expand(a, -1, -1)], 1)
        if self.others_good is None:
            return [adv, base[a:]]
        # each good agent sees the velocities of the other good agents
        return [adv, torch.cat([base[a:], good_vel[w.const(self.others_good)].reshape(g, -1, e)], 1)]

    def reward(self, w: MPETorch) -> torch.Tensor:
        a = self.n_adv
        d = ((w.apos[a:, None] - w.apos[None, :a]) ** 2).sum(2).sqrt()  # [G, adversaries, E]
        caught = (d < self.agent_size[0] + self.agent_size[-1]).flatten(0, 1).sum(0)
        return (10.0 * caught.to(w.dtype))[None].expand(a, -1)

    def scripted(self, w: MPETorch, obs: list[torch.Tensor]) -> torch.Tensor:
        """The prey's actions: mpe's flee policy (away from the nearest predator) or uniformly random."""
        e, g, a = w.num_envs, self.n_good, self.n_adv
        if self.prey == "random":
            if w.continuous:
                return torch.rand(g, 5, e, generator=w.gen, device=w.device, dtype=w.dtype)
            return torch.randint(0, 5, (g, e), generator=w.gen, device=w.device)
        start = 4 + 2 * self.n_landmarks  # the predators' relative positions in the prey's observation
        rel = obs[1][:, start: start + 2 * a].reshape(g, a, 2, e).float()  # mpe's policy reads float32 obs
        near = torch.gather(rel, 1, (rel**2).sum(2).argmin(1)[:, None, None].expand(-1, 1, 2, -1))[:, 0]
        pos = near > 0  # [G, 2, E]
        if w.continuous:
            act = torch.zeros(g, 5, e, device=w.device, dtype=w.dtype)
            act.scatter_(1, torch.where(pos[:, :1], 1, 2), 1.0)
            act.scatter_(1, torch.where(pos[:, 1:], 3, 4), 1.0)
            return act
        x_axis = near[:, 0].abs() >= near[:, 1].abs()
        return torch.where(x_axis, torch.where(pos[:, 0], 1, 2), torch.where(pos[:, 1], 3, 4))


SCENARIOS: dict[str, type[Scenario]] = {
    "simple_v3": Simple,
    "simple_spread_v3": Spread,
    "simple_reference_v3": Reference,
    "simple_speaker_listener_v4": SpeakerListener,
    "simple_tag_v3": Tag,
}
# The same tasks as the mpe2 family, described once there.
TASKS = {name: MPE_TASKS[name] for name in SCENARIOS}


class MPETorch(BatchedEnv):
    """``E`` copies of one MPE scenario as tensors on ``device``, the copy index last: agent positions
    ``apos [A, 2, E]``, landmarks ``lpos [L, 2, E]``, velocities ``vel [A, 2, E]``, utterances
    ``c [A, dim_c, E]`` and each agent's goal landmark ``goal [A, E]`` (scenarios with goals)."""

    def __init__(self, scenario: Scenario, num_envs: int, max_cycles: int = 25, continuous: bool = False,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64, seed: int | None = None):
        if int(max_cycles) < 1:
            raise UsageError(f"mpe-torch: max_cycles must be >= 1, got {max_cycles}")
        self.sc, self.num_envs, self.max_cycles = scenario, int(num_envs), int(max_cycles)
        self.continuous, self.device, self.dtype = bool(continuous), torch.device(device), dtype
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(0 if seed is None else int(seed))
        sc, n_all, dc = scenario, len(scenario.names), scenario.dim_c
        move = torch.tensor(sc.movable)
        comm = ~torch.tensor(sc.silent) & (dc > 0)
        self._any_comm = bool(comm.any())
        self._move, self._comm = self.const(move[:, None]), self.const(comm[:, None, None])
        self._sens = self.const(torch.tensor(sc.accel)[:, None, None] * move[:, None, None])  # 0 if immobile
        self._mx, self._my = self.const(torch.tensor(_MOVES)[:, 0].contiguous()), self.const(torch.tensor(_MOVES)[:, 1])
        self._arange_c = self.const(torch.arange(max(dc, 1))[None, :, None])
        cap = torch.tensor(sc.max_speed)
        self._cap = self.const(cap[:, None, None]) if bool(torch.isfinite(cap).any()) else None
        self._comm_idx = self.const(torch.where(move, 5, 0)[:, None] + torch.arange(max(dc, 1))[None])  # [A, dc]
        # Colliding pairs (a < b over agents then landmarks, as mpe2 loops; landmark pairs move nothing) and
        # the signed incidence matrix that adds each pair's force to its movable agents: F = S @ f.
        sizes = list(sc.agent_size) + [sc.landmark_size] * sc.n_landmarks
        coll = [sc.agent_collide] * n_all + [sc.landmark_collide] * sc.n_landmarks
        pairs = [(a, b) for a in range(n_all) for b in range(a + 1, len(sizes)) if coll[a] and coll[b]]
        self._pairs = bool(pairs)
        if pairs:
            inc = torch.zeros(n_all, len(pairs))
            for p, (a, b) in enumerate(pairs):
                inc[a, p] = 1.0 if sc.movable[a] else 0.0
                if b < n_all:
                    inc[b, p] = -1.0 if sc.movable[b] else 0.0
            self._ia = self.const(torch.tensor([a for a, _ in pairs]))
            self._ib = self.const(torch.tensor([b for _, b in pairs]))
            self._dmin = self.const(torch.tensor([sizes[a] + sizes[b] for a, b in pairs])[:, None, None])
            self._inc = self.const(inc)
        self._reset_world()
        groups = sc.observe(self)
        raw = [g.shape[1] for g in groups for _ in range(g.shape[0])]
        team = range(sc.n_team)
        if self.continuous:
            act = [(5 if sc.movable[i] else 0) + (dc if comm[i] else 0) for i in team]
        else:
            act = [(5 if sc.movable[i] else 1) * (dc if comm[i] else 1) for i in team]
        self.spec = EnvSpec(
            agent_ids=tuple(sc.names[: sc.n_team]), obs_dims=tuple(raw[: sc.n_team]), state_dim=sum(raw),
            action_kind="continuous" if self.continuous else "discrete", action_dims=tuple(act),
            action_low=tuple((0.0,) * d for d in act) if self.continuous else None,
            action_high=tuple((1.0,) * d for d in act) if self.continuous else None,
            episode_limit=self.max_cycles, team_reward=sc.team_reward,
        )
        self._pad = [self.spec.obs_dim - g.shape[1] for g in groups]
        mask = torch.as_tensor(self.spec.action_dim_mask())  # the real action slots (dims) of each agent
        self._mask = self.const(mask)[None].expand(self.num_envs, -1, -1)
        self._active = torch.ones(self.num_envs, sc.n_team, dtype=torch.bool, device=self.device)
        self._ret = torch.zeros(sc.n_team, self.num_envs, dtype=torch.float64, device=self.device)
        self._groups = groups

    def const(self, t: torch.Tensor) -> torch.Tensor:
        """A constant on this env's device, floats in its dtype, cached per tensor object (so only pass
        tensors that live as long as the env, e.g. scenario attributes; the cache keeps ``t`` alive so
        its id is never reused)."""
        cache = self.__dict__.setdefault("_consts", {})
        key = id(t)
        if key not in cache:
            cache[key] = (t, t.to(self.device, self.dtype if t.is_floating_point() else t.dtype))
        return cache[key][1]

    # ------------------------------------------------------------------ world
    def _rand(self, *shape: int, r: float = 1.0) -> torch.Tensor:
        return torch.rand(*shape, generator=self.gen, device=self.device, dtype=self.dtype) * (2 * r) - r

    def _reset_world(self) -> None:
        e, sc = self.num_envs, self.sc
        n = len(sc.names)
        self.apos = self._rand(n, 2, e)
        self.lpos = self._rand(sc.n_landmarks, 2, e, r=sc.landmark_range)
        self.vel = torch.zeros(n, 2, e, device=self.device, dtype=self.dtype)
        self.c = torch.zeros(n, sc.dim_c, e, device=self.device, dtype=self.dtype)
        self.goal = torch.randint(0, max(sc.n_landmarks, 1), (n, e), generator=self.gen, device=self.device)
        self.t = 0

    def set_world(self, apos: Any, lpos: Any, vel: Any, c: Any | None = None, goal: Any | None = None) -> BatchObs:
        """Overwrite every copy's world (e.g. with mpe2's) and observe it. Arrays are copy-first:
        ``apos [E, A, 2]``, ``lpos [E, L, 2]``, ``vel [E, A, 2]``, ``c [E, A, dim_c]``, ``goal [E, A]``."""
        def put(x: Any, like: torch.Tensor) -> torch.Tensor:
            t = torch.as_tensor(x).to(self.device, like.dtype)
            return t.permute(*range(1, t.dim()), 0).reshape(like.shape).contiguous()
        self.apos, self.lpos, self.vel = put(apos, self.apos), put(lpos, self.lpos), put(vel, self.vel)
        if c is not None:
            self.c = put(c, self.c)
        if goal is not None:
            self.goal = put(goal, self.goal)
        self._groups = self.sc.observe(self)
        return self._pack(self._groups, first=True)

    def _decode(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forces ``u [A, 2, E]`` and utterances ``c [A, dim_c, E]`` (None: all silent) from the actions."""
        dc = self.sc.dim_c
        if self.continuous:  # [A, D, E] in [0, 1]: u = (a2 - a1, a4 - a3) * accel; c = the next dim_c entries
            a = a.clamp(0.0, 1.0)
            if a.shape[1] >= 5:
                u = torch.stack([a[:, 2] - a[:, 1], a[:, 4] - a[:, 3]], 1)
            else:  # nobody moves (only speakers)
                u = a.new_zeros(a.shape[0], 2, a.shape[2])
            if not self._any_comm:
                return u * self._sens, None
            idx = self._comm_idx.clamp(max=a.shape[1] - 1)[:, :, None].expand(-1, -1, a.shape[2])
            return u * self._sens, torch.gather(a, 1, idx)[:, :dc] * self._comm
        mv = torch.where(self._move, a % 5, 0)  # [A, E]: movement in a % 5, utterance in a // 5 (mpe2's order)
        u = torch.stack([self._mx[mv], self._my[mv]], 1) * self._sens
        if not self._any_comm:
            return u, None
        sym = torch.where(self._move, a // 5, a)
        return u, (sym[:, None] == self._arange_c).to(self.dtype)[:, :dc] * self._comm

    def _physics(self, u: torch.Tensor) -> None:
        """mpe2 ``World.step``: contact forces, then p += v dt; v = v (1 - damping) + F dt; speed caps."""
        force = u
        if self._pairs:
            ent = torch.cat([self.apos, self.lpos], 0) if self.sc.landmark_collide else self.apos
            delta = ent[self._ia] - ent[self._ib]  # [P, 2, E]
            dist = (delta**2).sum(1, keepdim=True).sqrt()
            pen = F.softplus(-(dist - self._dmin) / CONTACT_MARGIN) * CONTACT_MARGIN
            f = CONTACT_FORCE * delta / dist * pen
            force = force + torch.matmul(self._inc, f.flatten(1)).view_as(u)
        self.apos = self.apos + self.vel * DT
        vel = self.vel * (1 - DAMPING) + force * DT
        if self._cap is not None:
            speed = (vel**2).sum(1, keepdim=True).sqrt()
            vel = torch.where(speed > self._cap, vel / speed * self._cap, vel)
        self.vel = vel

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        """``[A, D, E]`` (this env's dtype) -> ``[E, A, D]`` float32, contiguous, in one copy."""
        return torch.empty(x.shape[2], x.shape[0], x.shape[1], device=self.device).copy_(x.permute(2, 0, 1))

    def _pack(self, groups: list[torch.Tensor], first: bool = False) -> BatchObs:
        n = self.sc.n_team
        if len(groups) == 1 and not self._pad[0]:
            full = self._out(groups[0])
            obs, state = full[:, :n], full.flatten(1)
        else:
            state = torch.cat([self._out(g).flatten(1) for g in groups], 1)
            obs = self._out(torch.cat([F.pad(g, (0, 0, 0, p)) if p else g for g, p in zip(groups, self._pad)], 0)[:n])
        return BatchObs(obs=obs, state=state, action_mask=self._mask, active=self._active,
                        first=torch.full((self.num_envs,), first, dtype=torch.bool, device=self.device))

    # ------------------------------------------------------------------ API
    def reset(self, seed: int | None = None) -> BatchObs:
        """Reset every copy; ``seed`` reseeds the one generator all copies draw from."""
        if seed is not None:
            self.gen.manual_seed(int(seed))
        self._reset_world()
        self._ret.zero_()
        self._groups = self.sc.observe(self)
        return self._pack(self._groups, first=True)

    def step(self, actions: torch.Tensor) -> BatchStep:
        e, sc = self.num_envs, self.sc
        a = torch.as_tensor(actions, device=self.device)
        want = (e, sc.n_team) if not self.continuous else (e, sc.n_team, self.spec.act_dim)
        if tuple(a.shape) != want:
            raise UsageError(f"mpe-torch: actions must have shape {want}, got {tuple(a.shape)}")
        a = a.permute(1, 2, 0).to(self.dtype) if self.continuous else a.T.long()
        other = sc.scripted(self, self._groups)
        if other is not None:
            a = torch.cat([a, other], 0)
        u, c = self._decode(a)
        self._physics(u)
        if c is not None:
            self.c = c
        reward = sc.reward(self)
        self._ret += reward
        self.t += 1
        self._groups = sc.observe(self)
        final = self._pack(self._groups)
        done = self.t >= self.max_cycles
        episodes: Sequence[EpisodeStats] = []
        if done:
            # On the device, read when the collector reads the rollout's episodes (no host round trip per step).
            episodes = EpisodeBatch(self._ret.T.clone(), self.t, truncated=True)
            nxt = self.reset()
        else:
            nxt = final
        flag = torch.full((e,), done, dtype=torch.bool, device=self.device)
        return BatchStep(next=nxt, final=final, reward=reward.T.float().contiguous(), cost=None,
                         terminated=torch.zeros_like(flag), truncated=flag, episodes=episodes)


_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def make_mpe_torch(task: str, num_envs: int, seed: int | None = None, device: str = "cpu", max_cycles: int = 25,
                   continuous: bool = False, dtype: str = "float64", **kw: Any) -> MPETorch:
    """``num_envs`` copies of ``task``; ``kw`` are the scenario's own parameters (as in ``mpe/``)."""
    if dtype not in _DTYPES:
        raise UsageError(f"mpe-torch/{task}: dtype must be 'float32' or 'float64', got {dtype!r}")
    cls = SCENARIOS[task]
    try:
        scenario = cls(**kw)
    except TypeError as e:
        import inspect

        allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise UsageError(f"mpe-torch/{task}: unknown parameter in {sorted(kw)}; it takes max_cycles, continuous, "
                         f"dtype{''.join(', ' + p for p in allowed)}") from e
    return MPETorch(scenario, num_envs, max_cycles=max_cycles, continuous=continuous, device=device,
                    dtype=_DTYPES[dtype], seed=seed)


register_family(
    EnvFamily(
        name="mpe-torch",
        description="MPE natively batched in torch (mpe2's physics; any device); add ?continuous=true for Box actions",
        tasks=TASKS,
        make_batched=make_mpe_torch,
    )
)
