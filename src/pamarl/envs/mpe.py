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

from pamarl.envs.pettingzoo import PettingZooEnv, random_policy
from pamarl.envs.registry import EnvFamily, register_family
from pamarl.errors import UsageError

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


def make_mpe(task: str, seed: int | None = None, continuous: bool = False, prey: str = "flee", **kw: Any) -> PettingZooEnv:
    """One copy of an mpe2 task as a :class:`PettingZooEnv`."""
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
    return PettingZooEnv(
        env,
        agents=team,
        other_policy=other,
        episode_limit=int(kw["max_cycles"]),
        team_reward=team_reward,
        seed=seed,
    )


register_family(
    EnvFamily(
        name="mpe",
        description="PettingZoo Multi-Particle Environments (mpe2); add ?continuous=true for Box actions",
        tasks=TASKS,
        make_single=make_mpe,
    )
)
