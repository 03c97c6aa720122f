"""Multi-Particle Environments natively batched in torch: ``E`` worlds stepped as a few tensor operations.

Ids: ``mpe-torch/<task>`` with the same task names, parameters and tensors as :mod:`pamarl.envs.mpe`
(``N``, ``local_ratio``, ``max_cycles``, ``continuous``, and for ``simple_tag_v3`` ``prey`` and the
``num_good``/``num_adversaries``/``num_obstacles`` counts), plus ``dtype`` (``float32`` default, or
``float64`` as mpe2 computes). The physics is mpe2's ``World.step`` (semi-implicit Euler, damping 0.25,
softplus contact forces between colliding entities, speed caps) and each scenario's observation and
reward, written once for all copies and all agents; ``tests/test_mpe_torch.py`` checks observations,
state, rewards and time limits against the ``mpe/`` family (mpe2 itself) step for step.

Differences from ``mpe/`` that the learner never sees: every copy runs on one episode clock (no
supported task ends early, so all copies reset together, every ``max_cycles`` steps), and resets draw
from one torch generator seeded by ``reset(seed)`` rather than one numpy stream per copy.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from pamarl.envs.base import BatchedEnv, BatchObs, BatchStep, EnvSpec, EpisodeStats
from pamarl.envs.registry import EnvFamily, register_family
from pamarl.errors import UsageError

DT, DAMPING, CONTACT_FORCE, CONTACT_MARGIN = 0.1, 0.25, 100.0, 1e-3  # mpe2 core.World defaults
# Discrete movement actions 0..4 (no-op, -x, +x, -y, +y), as mpe2's SimpleEnv._set_action decodes them.
_MOVES = [[0.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]]


class Scenario:
    """Static layout of one mpe2 scenario plus its observation and reward, batched over ``[E, ...]``."""

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
        """Raw observations of every agent, as groups ``[E, n_g, d_g]`` in agent order."""
        raise NotImplementedError

    def reward(self, w: MPETorch) -> torch.Tensor:
        """``[E, n_team]`` rewards after a physics step (the local_ratio mix already applied)."""
        raise NotImplementedError

    def scripted(self, w: MPETorch, obs: list[torch.Tensor]) -> torch.Tensor | None:
        """Actions of the agents outside the team, as ``[E, A - n_team]`` (discrete) or ``[..., 5]``."""
        return None


def _others(n: int) -> torch.Tensor:
    """``[n, n-1]``: for each agent, the other agents in world order (how mpe2 lists them)."""
    return torch.tensor([[j for j in range(n) if j != i] for i in range(n)], dtype=torch.long).reshape(n, n - 1)


class Simple(Scenario):
    """simple_v3: one agent, one landmark; reward -|p - l|^2; obs [vel, landmark - p]."""

    def __init__(self) -> None:
        self.names, self.n_team, self.n_landmarks = ["agent_0"], 1, 1
        self._defaults(1)
        self.team_reward = True

    def observe(self, w: MPETorch) -> list[torch.Tensor]:
        return [torch.cat([w.vel, w.lpos - w.apos], -1)]

    def reward(self, w: MPETorch) -> torch.Tensor:
        return -((w.apos - w.lpos) ** 2).sum(-1)


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
        self.not_self = ~torch.eye(n, dtype=torch.bool)

    def observe(self, w: MPETorch) -> list[torch.Tensor]:
        e, n = w.num_envs, self.n_team
        o = w.const(self.others)
        rel_l = (w.lpos[:, None] - w.apos[:, :, None]).reshape(e, n, -1)
        rel_o = (w.apos[:, o] - w.apos[:, :, None]).reshape(e, n, -1)
        comm = w.c[:, o].reshape(e, n, -1)
        return [torch.cat([w.vel, w.apos, rel_l, rel_o, comm], -1)]

    def reward(self, w: MPETorch) -> torch.Tensor:
        d_al = ((w.apos[:, :, None] - w.lpos[:, None]) ** 2).sum(-1).sqrt()  # [E, A, L]
        glob = -d_al.min(1).values.sum(-1, keepdim=True)
        d_aa = ((w.apos[:, :, None] - w.apos[:, None]) ** 2).sum(-1).sqrt()
        hit = (d_aa < 2 * self.agent_size[0]) & w.const(self.not_self)
        local = -hit.sum(-1).to(w.dtype)
        lr = float(self.local_ratio or 0.0)
        return glob * (1 - lr) + local * lr


_REF_COLORS = [[0.75, 0.25, 0.25], [0.25, 0.75, 0.25], [0.25, 0.25, 0.75]]
_SL_COLORS = [[0.65, 0.15, 0.15], [0.15, 0.65, 0.15], [0.15, 0.15, 0.65]]


class Reference(Scenario):
    """simple_reference_v3: each agent is told (by the other, dim_c=10) which of 3 landmarks to reach."""

    def __init__(self, local_ratio: float = 0.5) -> None:
        self.names, self.n_team, self.n_landmarks, self.dim_c = ["agent_0", "agent_1"], 2, 3, 10
        self._defaults(2)
        self.silent = [False, False]
        self.local_ratio = float(local_ratio)
        self.colors = torch.tensor(_REF_COLORS)

    def observe(self, w: MPETorch) -> list[torch.Tensor]:
        e = w.num_envs
        rel_l = (w.lpos[:, None] - w.apos[:, :, None]).reshape(e, 2, -1)
        color = w.const(self.colors)[w.goal]  # [E, 2, 3]: the colour of goal_b
        return [torch.cat([w.vel, rel_l, color, w.c.flip(1)], -1)]

    def reward(self, w: MPETorch) -> torch.Tensor:
        target = torch.gather(w.lpos, 1, w.goal[..., None].expand(-1, -1, 2))  # goal_b of each agent
        own = -((w.apos.flip(1) - target) ** 2).sum(-1).sqrt()  # goal_a is the other agent
        lr = float(self.local_ratio or 0.0)
        return own.mean(1, keepdim=True) * (1 - lr) + own * lr


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
        self.colors = torch.tensor(_SL_COLORS)

    def observe(self, w: MPETorch) -> list[torch.Tensor]:
        e = w.num_envs
        speaker = w.const(self.colors)[w.goal[:, :1]]  # [E, 1, 3]
        rel_l = (w.lpos - w.apos[:, 1:]).reshape(e, 1, -1)
        listener = torch.cat([w.vel[:, 1:], rel_l, w.c[:, :1]], -1)
        return [speaker, listener]

    def reward(self, w: MPETorch) -> torch.Tensor:
        target = torch.gather(w.lpos, 1, w.goal[:, :1, None].expand(-1, -1, 2))[:, 0]
        r = -((w.apos[:, 1] - target) ** 2).sum(-1, keepdim=True)
        return r.expand(-1, 2)


class Tag(Scenario):
    """simple_tag_v3: the adversaries (learning, first) chase scripted prey among obstacles; +10 per catch."""

    def __init__(self, num_good: int = 1, num_adversaries: int = 3, num_obstacles: int = 2, prey: str = "flee"):
        if prey not in ("flee", "random"):
            raise UsageError(f"mpe-torch/simple_tag_v3: prey must be 'flee' or 'random', got {prey!r}")
        g, a, L = int(num_good), int(num_adversaries), int(num_obstacles)  # noqa: N806
        if g < 1 or a < 1 or L < 0:
            raise UsageError("mpe-torch/simple_tag_v3: need num_good >= 1, num_adversaries >= 1, num_obstacles >= 0")
        self.names = [f"adversary_{i}" for i in range(a)] + [f"agent_{i}" for i in range(g)]
        self.n_team, self.n_landmarks, self.dim_c, self.n_adv, self.n_good = a, L, 2, a, g
        self._defaults(a + g)
        self.agent_size = [0.075] * a + [0.05] * g
        self.accel = [3.0] * a + [4.0] * g
        self.max_speed = [1.0] * a + [1.3] * g
        self.landmark_size, self.agent_collide, self.landmark_collide, self.landmark_range = 0.2, True, True, 0.9
        self.prey = prey
        self.others = _others(a + g)
        self.others_good = _others(g) if g > 1 else None

    def observe(self, w: MPETorch) -> list[torch.Tensor]:
        e, n, a = w.num_envs, self.n_adv + self.n_good, self.n_adv
        o = w.const(self.others)
        rel_l = (w.lpos[:, None] - w.apos[:, :, None]).reshape(e, n, -1)
        rel_o = (w.apos[:, o] - w.apos[:, :, None]).reshape(e, n, -1)
        base = torch.cat([w.vel, w.apos, rel_l, rel_o], -1)
        good_vel = w.vel[:, a:]
        adv = torch.cat([base[:, :a], good_vel.reshape(e, 1, -1).expand(-1, a, -1)], -1)
        # each good agent sees the velocities of the other good agents
        og = w.const(self.others_good) if self.others_good is not None else None
        prey_vel = good_vel[:, og].reshape(e, self.n_good, -1) if og is not None else base.new_zeros(e, 1, 0)
        return [adv, torch.cat([base[:, a:], prey_vel], -1)]

    def _caught(self, w: MPETorch) -> torch.Tensor:
        d = ((w.apos[:, self.n_adv:, None] - w.apos[:, None, : self.n_adv]) ** 2).sum(-1).sqrt()  # [E, G, A]
        return d < (0.075 + 0.05)

    def reward(self, w: MPETorch) -> torch.Tensor:
        r = 10.0 * self._caught(w).flatten(1).sum(-1, keepdim=True).to(w.dtype)
        return r.expand(-1, self.n_adv)

    def scripted(self, w: MPETorch, obs: list[torch.Tensor]) -> torch.Tensor:
        """The prey's actions: mpe's flee policy (away from the nearest predator) or uniformly random."""
        e, g = w.num_envs, self.n_good
        if self.prey == "random":
            if w.continuous:
                return torch.rand(e, g, 5, generator=w.gen, device=w.device, dtype=w.dtype)
            return torch.randint(0, 5, (e, g), generator=w.gen, device=w.device)
        start = 4 + 2 * self.n_landmarks  # predators' relative positions in the prey's observation
        rel = obs[1][..., start: start + 2 * self.n_adv].reshape(e, g, self.n_adv, 2)
        near = torch.gather(rel, 2, (rel**2).sum(-1).argmin(-1)[..., None, None].expand(-1, -1, 1, 2))[:, :, 0]
        pos = near > 0
        if w.continuous:
            a = torch.zeros(e, g, 5, device=w.device, dtype=w.dtype)
            a.scatter_(2, torch.where(pos[..., :1], 1, 2), 1.0)
            a.scatter_(2, torch.where(pos[..., 1:], 3, 4), 1.0)
            return a
        x_axis = near[..., 0].abs() >= near[..., 1].abs()
        return torch.where(x_axis, torch.where(pos[..., 0], 1, 2), torch.where(pos[..., 1], 3, 4))


SCENARIOS: dict[str, type[Scenario]] = {
    "simple_v3": Simple,
    "simple_spread_v3": Spread,
    "simple_reference_v3": Reference,
    "simple_speaker_listener_v4": SpeakerListener,
    "simple_tag_v3": Tag,
}
TASKS = {
    "simple_spread_v3": "N agents cover N landmarks, avoiding collisions (cooperative)",
    "simple_reference_v3": "2 agents each guide the other to a landmark by communication",
    "simple_speaker_listener_v4": "a speaker tells a listener which landmark to reach (heterogeneous)",
    "simple_tag_v3": "predators (learning) chase a scripted prey among obstacles",
    "simple_v3": "one agent reaches a landmark (sanity check)",
}


class MPETorch(BatchedEnv):
    """``E`` copies of one MPE scenario as tensors on ``device``: positions ``apos [E, A, 2]``,
    landmarks ``lpos [E, L, 2]``, velocities ``vel [E, A, 2]``, utterances ``c [E, A, dim_c]`` and each
    agent's goal landmark ``goal [E, A]`` (scenarios with goals)."""

    def __init__(self, scenario: Scenario, num_envs: int, max_cycles: int = 25, continuous: bool = False,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int | None = None):
        if int(max_cycles) < 1:
            raise UsageError(f"mpe-torch: max_cycles must be >= 1, got {max_cycles}")
        self.sc, self.num_envs, self.max_cycles = scenario, int(num_envs), int(max_cycles)
        self.continuous, self.device, self.dtype = bool(continuous), torch.device(device), dtype
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(0 if seed is None else int(seed))
        sc, n_all, dc = scenario, len(scenario.names), scenario.dim_c
        move = torch.tensor(sc.movable)
        comm = ~torch.tensor(sc.silent) & (dc > 0)
        self._move, self._comm = self.const(move), self.const(comm)
        self._sens = self.const(torch.tensor(sc.accel)[:, None] * move[:, None])  # [A, 1]: 0 if immobile
        self._moves = self.const(torch.tensor(_MOVES)) if not self.continuous else None
        cap = torch.tensor(sc.max_speed)
        self._cap = self.const(cap[:, None]) if bool(torch.isfinite(cap).any()) else None
        self._comm_idx = self.const((torch.where(move, 5, 0)[:, None] + torch.arange(max(dc, 1))[None]))
        # Colliding pairs (a < b over agents then landmarks, as mpe2 loops) and the signed incidence
        # matrix that adds each pair's force to its movable agents: F = S @ f.
        sizes = list(sc.agent_size) + [sc.landmark_size] * sc.n_landmarks
        coll = [sc.agent_collide] * n_all + [sc.landmark_collide] * sc.n_landmarks
        pairs = [(a, b) for a in range(len(sizes)) for b in range(a + 1, len(sizes)) if coll[a] and coll[b]]
        pairs = [(a, b) for a, b in pairs if a < n_all]  # landmarks never move: their mutual forces act on nothing
        self._pairs = bool(pairs)
        if pairs:
            s = torch.zeros(n_all, len(pairs))
            for p, (a, b) in enumerate(pairs):
                s[a, p] = 1.0 if sc.movable[a] else 0.0
                if b < n_all:
                    s[b, p] = -1.0 if sc.movable[b] else 0.0
            self._ia = self.const(torch.tensor([a for a, _ in pairs]))
            self._ib = self.const(torch.tensor([b for _, b in pairs]))
            self._dmin = self.const(torch.tensor([sizes[a] + sizes[b] for a, b in pairs])[:, None])
            self._S = self.const(s)
        self.reset(seed)
        raw = [g.shape[-1] for g in sc.observe(self) for _ in range(g.shape[1])]
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
        width = self.spec.obs_dim
        self._pad = [width - g.shape[-1] for g in sc.observe(self)]
        mask = torch.as_tensor(self.spec.action_dim_mask())  # the real action slots (dims) of each agent
        self._mask = self.const(mask)[None].expand(self.num_envs, -1, -1)
        self._active = torch.ones(self.num_envs, sc.n_team, dtype=torch.bool, device=self.device)
        self._ret = torch.zeros(self.num_envs, sc.n_team, dtype=torch.float64, device=self.device)

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
    def _rand(self, *shape: int, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
        return torch.rand(*shape, generator=self.gen, device=self.device, dtype=self.dtype) * (hi - lo) + lo

    def _reset_world(self) -> None:
        e, sc = self.num_envs, self.sc
        n = len(sc.names)
        self.apos = self._rand(e, n, 2)
        self.lpos = self._rand(e, sc.n_landmarks, 2, lo=-sc.landmark_range, hi=sc.landmark_range)
        self.vel = torch.zeros(e, n, 2, device=self.device, dtype=self.dtype)
        self.c = torch.zeros(e, n, sc.dim_c, device=self.device, dtype=self.dtype)
        self.goal = torch.randint(0, max(sc.n_landmarks, 1), (e, n), generator=self.gen, device=self.device)
        self.t = 0

    def set_world(self, apos: Any, lpos: Any, vel: Any, c: Any | None = None, goal: Any | None = None) -> BatchObs:
        """Overwrite the world state of every copy (e.g. with an mpe2 world's) and observe it."""
        def put(x: Any, like: torch.Tensor) -> torch.Tensor:
            return torch.as_tensor(x).to(self.device, like.dtype).reshape(like.shape).clone()
        self.apos, self.lpos, self.vel = put(apos, self.apos), put(lpos, self.lpos), put(vel, self.vel)
        if c is not None:
            self.c = put(c, self.c)
        if goal is not None:
            self.goal = put(goal, self.goal)
        self._groups = self.sc.observe(self)
        return self._pack(self._groups)

    def _decode(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forces ``u [E, A, 2]`` and utterances ``c [E, A, dim_c]`` from every agent's action."""
        dc = self.sc.dim_c
        if self.continuous:
            a = a.to(self.dtype).clamp(0.0, 1.0)
            u = torch.stack([a[..., 2] - a[..., 1], a[..., 4] - a[..., 3]], -1) if a.shape[-1] >= 5 else \
                a.new_zeros(*a.shape[:-1], 2)
            u = u * self._sens
            idx = self._comm_idx.clamp(max=a.shape[-1] - 1)[None].expand(a.shape[0], -1, -1)
            c = torch.gather(a, 2, idx)[..., :dc] * self._comm[:, None]
            return u, c
        a = a.long()
        assert self._moves is not None
        u = self._moves[torch.where(self._move, a % 5, 0)] * self._sens
        c = F.one_hot(torch.where(self._move, a // 5, a).clamp(0, max(dc, 1) - 1), max(dc, 1)).to(self.dtype)
        return u, (c * self._comm[:, None])[..., :dc]

    def _physics(self, u: torch.Tensor) -> None:
        """mpe2 ``World.step``: contact forces, then p += v dt; v = v (1 - damping) + F dt; speed caps."""
        force = u
        if self._pairs:
            ent = torch.cat([self.apos, self.lpos], 1) if self.sc.landmark_collide else self.apos
            delta = ent[:, self._ia] - ent[:, self._ib]  # [E, P, 2]
            dist = (delta**2).sum(-1, keepdim=True).sqrt()
            pen = F.softplus(-(dist - self._dmin) / CONTACT_MARGIN) * CONTACT_MARGIN
            force = force + torch.matmul(self._S, CONTACT_FORCE * delta / dist * pen)
        self.apos = self.apos + self.vel * DT
        vel = self.vel * (1 - DAMPING) + force * DT
        if self._cap is not None:
            speed = (vel**2).sum(-1, keepdim=True).sqrt()
            vel = torch.where(speed > self._cap, vel / speed * self._cap, vel)
        self.vel = vel

    def _pack(self, groups: list[torch.Tensor]) -> BatchObs:
        state = torch.cat([g.flatten(1) for g in groups], 1) if len(groups) > 1 else groups[0].flatten(1)
        padded = [F.pad(g, (0, p)) if p else g for g, p in zip(groups, self._pad)] if hasattr(self, "_pad") \
            else groups
        obs = torch.cat(padded, 1) if len(padded) > 1 else padded[0]
        return BatchObs(obs=obs[:, : self.sc.n_team].float(), state=state.float(), action_mask=self._mask,
                        active=self._active)

    # ------------------------------------------------------------------ API
    def reset(self, seed: int | None = None) -> BatchObs:
        """Reset every copy; ``seed`` reseeds the one generator all copies draw from."""
        if seed is not None:
            self.gen.manual_seed(int(seed))
        self._reset_world()
        self._groups = self.sc.observe(self)
        if hasattr(self, "_ret"):
            self._ret.zero_()
            return self._pack(self._groups)
        return None  # type: ignore[return-value]  # first call from __init__, before the spec exists

    def step(self, actions: torch.Tensor) -> BatchStep:
        e, sc = self.num_envs, self.sc
        a = torch.as_tensor(actions, device=self.device)
        want = (e, sc.n_team) if not self.continuous else (e, sc.n_team, self.spec.act_dim)
        if tuple(a.shape) != want:
            raise UsageError(f"mpe-torch: actions must have shape {want}, got {tuple(a.shape)}")
        other = sc.scripted(self, self._groups)
        if other is not None:
            a = torch.cat([a.to(other.dtype) if self.continuous else a.long(), other], 1)
        u, c = self._decode(a)
        self._physics(u)
        self.c = c
        reward = sc.reward(self).float()
        self._ret += reward
        self.t += 1
        self._groups = sc.observe(self)
        final = self._pack(self._groups)
        done = self.t >= self.max_cycles
        episodes: list[EpisodeStats] = []
        if done:
            rets = self._ret.tolist()
            episodes = [EpisodeStats(team_return=sum(r), agent_returns=r, length=self.t, truncated=True) for r in rets]
            nxt = self.reset()
        else:
            nxt = final
        flag = torch.full((e,), done, dtype=torch.bool, device=self.device)
        return BatchStep(next=nxt, final=final, reward=reward, cost=None, terminated=torch.zeros_like(flag),
                         truncated=flag, episodes=episodes)


_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def make_mpe_torch(task: str, num_envs: int, seed: int | None = None, device: str = "cpu", max_cycles: int = 25,
                   continuous: bool = False, dtype: str = "float32", **kw: Any) -> MPETorch:
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
