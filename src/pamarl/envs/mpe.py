"""PettingZoo MPE tasks from the ``mpe2`` package.

Ids: ``mpe/<task>`` with parameters passed to the mpe2 constructor (``N``, ``max_cycles``,
``local_ratio``, ...) plus ``continuous`` (bool, default false). For ``simple_tag_v3`` the learning
team is the adversaries (predators); the prey follows ``prey`` = ``"flee"`` (default: moves away from
the nearest predator) or ``"random"``. For ``simple_adversary_v3`` the good agents learn against a
random adversary.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
from gymnasium import spaces

from pamarl.envs.base import EnvObs, EnvStep
from pamarl.envs.pettingzoo import PettingZooEnv, random_policy
from pamarl.envs.registry import EnvFamily, register_family
from pamarl.errors import UsageError
from pamarl.validation import Rule

TASKS = {
    "simple_spread_v3": "N agents cover N landmarks, avoiding collisions (cooperative)",
    "simple_reference_v3": "2 agents each guide the other to a landmark by communication",
    "simple_speaker_listener_v4": "a speaker tells a listener which landmark to reach (heterogeneous)",
    "simple_tag_v3": "predators (learning) chase a scripted prey among obstacles",
    "simple_v3": "one agent reaches a landmark (sanity check)",
    "simple_adversary_v3": "good agents (learning) reach the target while a random adversary watches",
    "simple_push_v3": "all agents learn (mixed task, rewards kept per agent)",
    "simple_crypto_v3": "all agents learn (mixed task, rewards kept per agent)",
    "simple_world_comm_v3": "all agents learn (mixed task, rewards kept per agent)",
}
_TEAMS = {
    "simple_tag_v3": lambda ids: [a for a in ids if a.startswith("adversary")],
    "simple_adversary_v3": lambda ids: [a for a in ids if a.startswith("agent")],
}
# Tasks where every learning agent has its own goal: reward=auto keeps their rewards per agent.
_MIXED = {"simple_push_v3", "simple_crypto_v3", "simple_world_comm_v3"}
_TEAM_REWARD = {"simple_reference_v3": False, "simple_speaker_listener_v4": True, "simple_v3": True}


def flee_policy(agent: str, obs: Any, space: spaces.Space, rng: np.random.Generator) -> Any:
    """Prey heuristic for simple_tag: step away from the nearest predator along its larger axis.

    The prey's observation is [vel(2), pos(2), landmarks rel (2 * n_landmarks), others rel (2 * n_adv),
    other good agents' vel]; with the default 2 obstacles and 3 predators the predators are 8:14.
    """
    if obs is None:
        return 0
    o = np.asarray(obs, np.float32)
    adv = o[8:14].reshape(-1, 2)
    rel = adv[np.argmin((adv**2).sum(1))]
    if isinstance(space, spaces.Box):  # continuous: [noop, -x, +x, -y, +y] intensities
        a = np.zeros(space.shape, np.float32)
        a[1 if rel[0] > 0 else 2] = 1.0
        a[3 if rel[1] > 0 else 4] = 1.0
        return a
    # discrete actions: 1 -> -x, 2 -> +x, 3 -> -y, 4 -> +y; move opposite to the predator
    if abs(rel[0]) >= abs(rel[1]):
        return 1 if rel[0] > 0 else 2
    return 3 if rel[1] > 0 else 4


class MPEEnv(PettingZooEnv):
    """An mpe2 task stepped through its world directly (the fast path).

    PettingZoo's parallel API for MPE goes through the AEC-to-parallel conversion and its wrappers,
    which cost about as much as the physics; and ``state()`` recomputes every observation. This class
    drives the same ``mpe2`` world the same way -- every agent's action set, one
    ``_execute_world_step``, the step counter and the time limit as ``SimpleEnv.step`` does -- and
    builds the state from the observations already computed (``SimpleEnv.state`` is exactly their
    concatenation). ``tests/test_envs.py`` checks that it matches the parallel API step for step.
    """

    def __init__(self, env: Any, **kw: Any):
        super().__init__(env, **kw)
        self.raw = self.env.unwrapped
        self._order = list(self.raw.possible_agents)
        self._team_index = {a: i for i, a in enumerate(self.team)}

    def _observe_all(self) -> dict[str, np.ndarray]:
        return {a: self.raw.observe(a) for a in self._order}

    def _pack_fast(self, obs: dict[str, np.ndarray]) -> EnvObs:
        packed = self._pack_agents(obs)
        packed.state = np.concatenate([obs[a] for a in self._order])
        return packed

    def reset(self, seed: int | None = None) -> EnvObs:
        if seed is not None:
            self._rng = np.random.default_rng(seed + 7919)
        self.raw.reset(seed=seed)
        self._active = np.ones(len(self.team), bool)
        self._last_obs = self._observe_all()
        return self._pack_fast(self._last_obs)

    def step(self, actions: np.ndarray) -> EnvStep:
        raw = self.raw
        for a in self._order:
            i = self._team_index.get(a)
            if i is not None:
                act = self._decode(i, actions[i])
            else:
                act = self.other_policy(a, self._last_obs.get(a), raw.action_space(a), self._rng)
            raw.current_actions[raw._index_map[a]] = act
        raw._execute_world_step()
        raw.steps += 1
        truncated = raw.steps >= raw.max_cycles
        terminated = (not truncated) and bool(raw.scenario.is_terminal(raw.world))
        obs = self._observe_all()
        self._last_obs = obs
        packed = self._pack_fast(obs)
        reward = np.array([raw.rewards[a] for a in self.team], np.float32)
        return EnvStep(obs=packed.obs, state=packed.state, action_mask=packed.action_mask, active=packed.active,
                       reward=reward, cost=None, terminated=terminated, truncated=bool(truncated))


def make_mpe(task: str, seed: int | None = None, continuous: bool = False, prey: str = "flee", fast: bool = True,
             **kw: Any) -> PettingZooEnv:
    """One copy of an mpe2 task; ``fast=False`` goes through PettingZoo's parallel API instead."""
    try:
        mod = importlib.import_module(f"mpe2.{task}")
    except ModuleNotFoundError as e:
        raise UsageError(f"mpe2 has no task {task!r}") from e
    kw.setdefault("max_cycles", 25)
    try:
        env = mod.parallel_env(continuous_actions=bool(continuous), **kw)
    except TypeError as e:
        raise UsageError(f"mpe/{task}: bad parameter: {e}") from e
    team_fn = _TEAMS.get(task)
    team = team_fn(env.possible_agents) if team_fn else None
    if prey not in ("flee", "random"):
        raise UsageError(f"mpe/{task}: prey must be 'flee' or 'random', got {prey!r}")
    other = flee_policy if (task == "simple_tag_v3" and prey == "flee") else random_policy
    team_reward = _TEAM_REWARD.get(task, False)
    cls = MPEEnv if fast else PettingZooEnv
    return cls(
        env,
        agents=team,
        other_policy=other,
        episode_limit=int(kw["max_cycles"]),
        team_reward=team_reward,
        seed=seed,
        cooperative=task not in _MIXED,
    )


_count = Rule(int, ge=1)
PARAMS = {
    "continuous": Rule(bool), "fast": Rule(bool), "prey": Rule(str, choices=("flee", "random")),
    "N": _count, "num_good": _count, "num_adversaries": _count, "max_cycles": _count,
    "num_obstacles": Rule(int, ge=0), "num_food": Rule(int, ge=0), "num_forests": Rule(int, ge=0),
    "local_ratio": Rule(float, ge=0.0, le=1.0), "dynamic_rescaling": Rule(bool), "benchmark_data": Rule(bool),
    "curriculum": Rule(bool), "terminate_on_success": Rule(bool),
    "num_agent_neighbors": Rule(int, ge=0, optional=True), "num_landmark_neighbors": Rule(int, ge=0, optional=True),
}
"""Id parameters and their ranges (:mod:`pamarl.validation`); mpe2 refuses the ones a task does not take."""

register_family(
    EnvFamily(
        name="mpe",
        description="PettingZoo Multi-Particle Environments (mpe2); add ?continuous=true for Box actions",
        tasks=TASKS,
        make_single=make_mpe,
        params=PARAMS,
    )
)
