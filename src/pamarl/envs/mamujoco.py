"""Multi-Agent MuJoCo (gymnasium-robotics' MaMuJoCo) and safe Multi-Agent MuJoCo with velocity costs.

Two env families, both needing the ``mujoco`` extra (``pip install 'pamarl[mujoco]'``):
(Length: the two families share one adapter and its documented partition and cost tables; about
490 lines, most of them the id grammar and the per-scenario tables below.)

* ``mamujoco/<Scenario>-<conf>``: a MuJoCo robot whose joints are split between agents;
* ``safe-mamujoco/<Scenario>-<conf>``: the same robot with a per-step velocity cost.

Env ids
-------
``<Scenario>`` is a MaMuJoCo scenario (``HalfCheetah``, ``Ant``, ``Walker2d``, ``Hopper``,
``Humanoid``, ``HumanoidStandup``, ``Swimmer``, ``Reacher``, ``ManySegmentSwimmer``, ``ManySegmentAnt``,
...) and ``<conf>`` its agent partition spelt as MaMuJoCo
spells it: ``<agents>x<joints per agent>`` (``HalfCheetah-2x3``, ``HalfCheetah-6x1``, ``Ant-2x4``,
``Ant-4x2``, ``Walker2d-2x3``, ``Hopper-3x1``), ``9|8`` for Humanoid (upper body 9 joints, lower body
8: ``Humanoid-9|8``), ``2x4d`` for Ant's diagonal split, and ``<agents>x<segments per agent>`` for the
scalable robots (``ManySegmentSwimmer-10x2``, ``ManySegmentAnt-2x3``). Examples::

    mamujoco/HalfCheetah-2x3
    mamujoco/Ant-4x2?agent_obsk=2&state=concat
    safe-mamujoco/Humanoid-9|8?episode_limit=500

Query parameters:

* ``agent_obsk`` (int, default 1): observation depth; each agent observes its own joints and those
  up to ``k`` hops away in the robot's kinematic graph (0 = own joints only).
* ``state`` (``env`` | ``concat``, default ``env``): the global state for centralised critics:
  ``env`` is the single-agent Gymnasium observation of the whole robot (MaMuJoCo's ``state()``),
  ``concat`` the concatenation of the agents' padded observations.
* ``episode_limit`` (int, default 1000): time limit in steps.
* ``velocity_threshold`` (float, safe family only): overrides the per-task threshold below; required
  for tasks without one.
* any other parameter goes to the underlying Gymnasium MuJoCo env (``ctrl_cost_weight``,
  ``reset_noise_scale``, ``width``/``height`` of rendered frames, ...).

Episode ends
------------
Every agent receives the robot's reward (``team_reward``) and all agents leave together. Gymnasium's
``terminated`` (the robot became unhealthy: Hopper, Walker2d, Ant, Humanoid fall over; HalfCheetah and
Swimmer never terminate) is reported as ``terminated`` (no bootstrap); reaching ``episode_limit`` is
reported as ``truncated`` (bootstrap from the final observation); when both happen on the same step the
step counts as terminated, since the robot really fell.

Safe Multi-Agent MuJoCo
-----------------------
The cost is the velocity constraint of Safety-Gymnasium's multi-agent velocity tasks
(``safety_gymnasium/tasks/safe_multi_agent/tasks/velocity/safe_mujoco_multi.py``, ``SafeMAEnv.step``
and ``TASK_VELCITY_THRESHOLD``), reimplemented here over gymnasium-robotics: every step costs 1 when
the robot's speed exceeds the task's threshold (:data:`VELOCITY_THRESHOLDS`) and 0 otherwise, the same
team cost for every agent. The speed is ``sqrt(x_velocity**2 + y_velocity**2)`` from the Gymnasium
step info, i.e. the finite-difference velocity over one env step of the point the robot's forward
reward uses: the root slide joint ``qpos[0]`` for HalfCheetah, Hopper and Walker2d (which report no
y-velocity, so the speed is ``|x_velocity|``), the torso for Ant and the whole-body centre of mass for
Humanoid (planar speed). Swimmers use the signed forward velocity ``x_velocity``, as Safety-Gymnasium
does for Swimmer.

The cost limit (the budget on the undiscounted episode cost) belongs to the constrained algorithm;
:data:`DEFAULT_COST_LIMIT` = 25 per 1000-step episode is the value of Safety-Gymnasium's velocity
benchmarks: at most 2.5 % of the steps may be spent above the speed threshold. Scale it with the
episode length (:func:`scaled_cost_limit`) when changing the time limit.

Rendering
---------
``render()`` returns an RGB frame from MuJoCo's offscreen renderer. The OpenGL context is created on
the first call only, so training copies that never render pay nothing. When ``MUJOCO_GL`` is unset, a
backend is chosen: ``glfw`` with a display, else ``egl``, else ``osmesa``; with none available
``render()`` raises :class:`RenderUnavailable` saying what to install (see :func:`find_gl_backend`).
"""

from __future__ import annotations

import contextlib
import ctypes.util
import difflib
import io
import logging
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

# The extra's packages (mujoco, gymnasium_robotics) are imported at module level on purpose: the
# registry maps both families to this module and, when the import fails with ModuleNotFoundError,
# tells the user to install pamarl[mujoco].
import mujoco
import numpy as np
from gymnasium.wrappers import TimeLimit
from pettingzoo.utils import BaseParallelWrapper

from pamarl.envs.base import EnvStep
from pamarl.envs.pettingzoo import PettingZooEnv
from pamarl.envs.registry import EnvFamily, register_family
from pamarl.errors import UsageError
from pamarl.validation import Rule

_log = logging.getLogger(__name__)
# gymnasium-robotics prints notices about unrelated envs (Adroit reward changes) to stderr on import;
# they would appear in every env worker, so they go to the debug log instead.
with contextlib.redirect_stderr(io.StringIO()) as _notices, contextlib.redirect_stdout(_notices):
    from gymnasium_robotics.envs.multiagent_mujoco.mujoco_multi import MultiAgentMujocoEnv
if _notices.getvalue().strip():
    _log.debug("gymnasium-robotics import notices: %s", _notices.getvalue().strip())

DEFAULT_EPISODE_LIMIT = 1000
DEFAULT_COST_LIMIT = 25.0
"""Default budget on the undiscounted episode cost for a 1000-step episode (Safety-Gymnasium's
velocity benchmarks): at most 25 steps per episode above the speed threshold."""


def scaled_cost_limit(episode_limit: int = DEFAULT_EPISODE_LIMIT) -> float:
    """:data:`DEFAULT_COST_LIMIT` for another episode length: the same 2.5 % of the steps."""
    return DEFAULT_COST_LIMIT * episode_limit / DEFAULT_EPISODE_LIMIT


VELOCITY_THRESHOLDS: dict[str, float] = {
    "HalfCheetah-2x3": 3.227,
    "HalfCheetah-6x1": 2.932,
    "Ant-2x4": 2.522,
    "Ant-4x2": 2.418,
    "Walker2d-2x3": 1.641,
    "Hopper-3x1": 0.9613,
    "Humanoid-9|8": 0.58,
    "Swimmer-2x1": 0.04891,
}
"""Speed thresholds (m/s) of the safe tasks, as in Safety-Gymnasium's multi-agent velocity tasks."""

SCENARIOS = (
    "Ant",
    "HalfCheetah",
    "Hopper",
    "Humanoid",
    "HumanoidStandup",
    "Reacher",
    "Swimmer",
    "Pusher",
    "Walker2d",
    "InvertedPendulum",
    "InvertedDoublePendulum",
    "ManySegmentSwimmer",
    "ManySegmentAnt",
    "CoupledHalfCheetah",
)
"""Scenarios MaMuJoCo can factorise (its agent partitions decide which confs exist)."""

TASKS = {
    "HalfCheetah-2x3": "2 agents: back leg / front leg, 3 joints each",
    "HalfCheetah-6x1": "6 agents, one joint each",
    "Ant-2x4": "2 agents: front legs / back legs, 4 joints each",
    "Ant-2x4d": "2 agents: diagonal leg pairs",
    "Ant-4x2": "4 agents, one leg (2 joints) each",
    "Walker2d-2x3": "2 agents: one leg each",
    "Hopper-3x1": "3 agents: thigh, leg, foot",
    "Humanoid-9|8": "2 agents: upper body (9 joints) / lower body (8 joints)",
    "HumanoidStandup-9|8": "Humanoid standing up, upper / lower body",
    "Swimmer-2x1": "2 agents, one joint each",
    "Reacher-2x1": "2 agents, one joint each",
    "ManySegmentSwimmer-10x2": "scalable swimmer: <agents>x<segments per agent>, e.g. 10x2",
    "ManySegmentAnt-2x3": "scalable ant: <agents>x<segments per agent>, e.g. 2x3",
}
"""Tasks listed by ``pamarl list``; any other ``<Scenario>-<conf>`` MaMuJoCo accepts works too.

``CoupledHalfCheetah-1p1`` is left out: gymnasium-robotics 1.4.2 fails to build it with mujoco 4.0
(its tendon observation indexes ``data.ten_J`` as a dense matrix)."""

_SIGNED_X_SPEED = {"Swimmer", "ManySegmentSwimmer"}  # Safety-Gymnasium: swimmers use the forward velocity
# Scenarios whose Gymnasium step info reports the robot's velocity (the others have no locomotion).
_LOCOMOTION = {
    "Ant",
    "HalfCheetah",
    "Hopper",
    "Humanoid",
    "Swimmer",
    "Walker2d",
    "ManySegmentSwimmer",
    "ManySegmentAnt",
}


# --------------------------------------------------------------------------------------- safety cost
def velocity_speed(info: Mapping[str, Any], signed_x: bool = False) -> float:
    """The speed that the velocity constraint measures, from a Gymnasium MuJoCo step ``info``.

    Planar speed ``sqrt(vx**2 + vy**2)`` (``vy = 0`` for robots that report no y-velocity), or the
    signed forward velocity ``vx`` when ``signed_x`` (swimmers), as in Safety-Gymnasium.
    """
    vx = float(info["x_velocity"])
    if signed_x:
        return vx
    return math.hypot(vx, float(info.get("y_velocity", 0.0)))


def velocity_cost(speed: float, threshold: float) -> float:
    """1.0 when ``speed`` exceeds ``threshold`` (strictly), else 0.0."""
    return float(speed > threshold)


class VelocityCostWrapper(BaseParallelWrapper):
    """A MaMuJoCo ParallelEnv that also reports the velocity cost.

    The standard PettingZoo ``step`` signature is kept (so PettingZoo's conformance tests and tools
    apply): the cost is added to each agent's info as ``infos[agent]["cost"]`` (and the measured speed
    as ``infos[agent]["speed"]``). ``last_cost`` / ``last_speed`` hold the values of the latest step.
    """

    def __init__(self, env: MultiAgentMujocoEnv, threshold: float, signed_x: bool = False):
        super().__init__(env)
        self.threshold = float(threshold)
        self.signed_x = bool(signed_x)
        self.last_cost = 0.0
        self.last_speed = 0.0

    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        self.last_cost = 0.0
        self.last_speed = 0.0
        return self.env.reset(seed=seed, options=options)

    def step(self, actions: dict[str, Any]) -> Any:
        obs, rew, term, trunc, infos = self.env.step(actions)
        # MaMuJoCo hands every agent the same Gymnasium info dict; read it once.
        info: Mapping[str, Any] = next(iter(infos.values()), {})
        self.last_speed = velocity_speed(info, self.signed_x)
        self.last_cost = velocity_cost(self.last_speed, self.threshold)
        infos = {a: {**i, "cost": self.last_cost, "speed": self.last_speed} for a, i in infos.items()}
        return obs, rew, term, trunc, infos


# --------------------------------------------------------------------------------------- rendering
class RenderUnavailable(RuntimeError):
    """MuJoCo cannot render in this process (no usable OpenGL backend); the message says what to do."""


_GL_HINT = (
    "install libegl1 (EGL: GPU driver or Mesa, headless) or libosmesa6 (software), "
    "or set MUJOCO_GL to egl, osmesa or glfw (glfw needs a display)"
)


def find_gl_backend() -> tuple[str | None, str]:
    """Choose MuJoCo's OpenGL backend for offscreen rendering.

    Returns ``(backend, "")`` with ``backend`` one of ``glfw``, ``egl``, ``osmesa``, or
    ``(None, reason)`` saying what is missing. An explicit ``MUJOCO_GL`` is honoured (and checked);
    otherwise a display means ``glfw`` and a headless machine uses EGL, then OSMesa.
    """
    has_display = bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    libs = {"egl": "EGL", "osmesa": "OSMesa"}
    chosen = os.environ.get("MUJOCO_GL", "").strip().lower()
    if chosen:
        if chosen not in ("glfw", "egl", "osmesa"):
            return None, f"no OpenGL backend: MUJOCO_GL={chosen!r} is not one of egl, osmesa, glfw"
        if chosen == "glfw" and not has_display:
            return None, "no OpenGL backend: MUJOCO_GL=glfw needs a display; headless, use egl or osmesa"
        if chosen in libs and ctypes.util.find_library(libs[chosen]) is None:
            pkg = "libegl1" if chosen == "egl" else "libosmesa6"
            return None, f"no OpenGL backend: MUJOCO_GL={chosen} but lib{libs[chosen]} is missing ({pkg})"
        return chosen, ""
    if has_display:
        return "glfw", ""
    for backend, lib in libs.items():
        if ctypes.util.find_library(lib) is not None:
            return backend, ""
    return None, f"no OpenGL backend for MuJoCo rendering: {_GL_HINT}"


# --------------------------------------------------------------------------------------- building
def parse_task(task: str) -> tuple[str, str]:
    """Split ``<Scenario>-<conf>`` (``"Humanoid-9|8"`` -> ``("Humanoid", "9|8")``)."""
    scenario, sep, conf = task.partition("-")
    if not sep or not scenario or not conf:
        raise UsageError(
            f"MaMuJoCo task {task!r}: write it as <Scenario>-<conf>, e.g. 'HalfCheetah-2x3', 'Humanoid-9|8' "
            "or 'ManySegmentSwimmer-10x2'"
        )
    if scenario not in SCENARIOS:
        close = difflib.get_close_matches(scenario, SCENARIOS, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UsageError(f"MaMuJoCo has no scenario {scenario!r}.{hint} Scenarios: {', '.join(SCENARIOS)}")
    return scenario, conf


@contextlib.contextmanager
def _mujoco_warnings_to_log() -> Iterator[None]:
    """Route MuJoCo's compile-time warnings to this module's logger while models are built.

    MuJoCo's default handler prints them and appends them to ``MUJOCO_LOG.TXT`` in the working
    directory; Gymnasium's bundled assets trigger a deprecation warning (``settotalmass``) on every
    build, which would otherwise litter run directories with one line per env copy.
    """
    previous = mujoco.get_mju_user_warning()
    mujoco.set_mju_user_warning(lambda msg: _log.debug("MuJoCo warning: %s", msg))
    try:
        yield
    finally:
        mujoco.set_mju_user_warning(previous)


def _time_limit_of(env: Any) -> int | None:
    """The ``max_episode_steps`` of the first TimeLimit wrapper around a Gymnasium env, if any."""
    while env is not None:
        if isinstance(env, TimeLimit):
            return int(env._max_episode_steps)
        env = getattr(env, "env", None)
    return None


def make_parallel_env(
    task: str,
    safe: bool = False,
    agent_obsk: int = 1,
    episode_limit: int = DEFAULT_EPISODE_LIMIT,
    velocity_threshold: float | None = None,
    **gym_kwargs: Any,
) -> MultiAgentMujocoEnv | VelocityCostWrapper:
    """Build the PettingZoo ParallelEnv behind ``mamujoco/<task>`` (``safe-mamujoco/<task>`` if ``safe``).

    This is what :class:`MaMuJoCoEnv` adapts; it is exposed for PettingZoo tooling and tests.
    """
    scenario, conf = parse_task(task)
    family = "safe-mamujoco" if safe else "mamujoco"
    if isinstance(agent_obsk, bool) or not isinstance(agent_obsk, int) or agent_obsk < 0:
        raise UsageError(f"{family}/{task}: agent_obsk must be an integer >= 0, got {agent_obsk!r}")
    if isinstance(episode_limit, bool) or not isinstance(episode_limit, int) or episode_limit < 1:
        raise UsageError(f"{family}/{task}: episode_limit must be an integer >= 1, got {episode_limit!r}")
    threshold: float | None = None
    if safe and scenario not in _LOCOMOTION:
        raise UsageError(
            f"safe-mamujoco/{task}: the velocity cost needs a locomotion robot ({', '.join(sorted(_LOCOMOTION))})"
        )
    if safe:
        threshold = VELOCITY_THRESHOLDS.get(task) if velocity_threshold is None else float(velocity_threshold)
        if threshold is None:
            raise UsageError(
                f"safe-mamujoco/{task}: no velocity threshold is known for this task; pass one, e.g. "
                f"'safe-mamujoco/{task}?velocity_threshold=1.0'. Known: {', '.join(VELOCITY_THRESHOLDS)}"
            )
    elif velocity_threshold is not None:
        raise UsageError(f"mamujoco/{task}: velocity_threshold only applies to the safe-mamujoco family")
    for reserved in ("render_mode", "max_episode_steps", "agent_conf", "scenario"):
        if reserved in gym_kwargs:
            raise UsageError(f"{family}/{task}: parameter {reserved!r} is set by pamarl, not in the env id")
    try:
        with _mujoco_warnings_to_log():
            env = MultiAgentMujocoEnv(
                scenario, conf, agent_obsk=agent_obsk, max_episode_steps=episode_limit, **gym_kwargs
            )
    except Exception as e:  # MaMuJoCo raises bare Exceptions for unknown partitions
        raise UsageError(
            f"{family}/{task}: MaMuJoCo cannot build scenario {scenario!r} with conf {conf!r} "
            f"and parameters {gym_kwargs or {}} ({type(e).__name__}: {e}). Known tasks: {', '.join(TASKS)}"
        ) from e
    # Scenarios built outside gymnasium.make (CoupledHalfCheetah) keep their own fixed time limit.
    built_limit = _time_limit_of(env.single_agent_env)
    if built_limit != episode_limit:
        env.close()
        raise UsageError(
            f"{family}/{task}: this scenario has a fixed episode limit of {built_limit}; "
            f"episode_limit={episode_limit} is not supported"
        )
    if safe:
        assert threshold is not None
        return VelocityCostWrapper(env, threshold, signed_x=scenario in _SIGNED_X_SPEED)
    return env


class MaMuJoCoEnv(PettingZooEnv):
    """One copy of a (safe) Multi-Agent MuJoCo task as a :class:`~pamarl.envs.base.MultiAgentEnv`.

    Builds the ParallelEnv with :func:`make_parallel_env` and adapts it with the generic PettingZoo
    adapter (padding, active masks, terminated vs truncated); adds the team cost of the safe family and
    MuJoCo offscreen rendering.

    Args:
        task: ``<Scenario>-<conf>``, e.g. ``"HalfCheetah-2x3"``.
        safe: add the velocity cost (``EnvStep.cost``, ``spec.has_cost``).
        agent_obsk: observation depth.
        state: ``"env"`` (the robot's full Gymnasium observation) or ``"concat"``.
        episode_limit: time limit in steps.
        velocity_threshold: safe family: overrides :data:`VELOCITY_THRESHOLDS`.
        seed: construction seed.
        gym_kwargs: passed to the Gymnasium MuJoCo env.
    """

    def __init__(
        self,
        task: str,
        safe: bool = False,
        agent_obsk: int = 1,
        state: str = "env",
        episode_limit: int = DEFAULT_EPISODE_LIMIT,
        velocity_threshold: float | None = None,
        seed: int | None = None,
        **gym_kwargs: Any,
    ):
        family = "safe-mamujoco" if safe else "mamujoco"
        if state not in ("env", "concat"):
            raise UsageError(f"{family}/{task}: state must be 'env' or 'concat', got {state!r}")
        penv = make_parallel_env(
            task,
            safe=safe,
            agent_obsk=agent_obsk,
            episode_limit=episode_limit,
            velocity_threshold=velocity_threshold,
            **gym_kwargs,
        )
        self.task = task
        self._render_checked = False
        self._cost_env = penv if isinstance(penv, VelocityCostWrapper) else None
        self._raw: MultiAgentMujocoEnv = penv.env if isinstance(penv, VelocityCostWrapper) else penv
        super().__init__(penv, state=state, episode_limit=episode_limit, team_reward=True, seed=seed)
        self.spec = replace(self.spec, has_cost=safe)

    @property
    def mujoco_env(self) -> Any:
        """The unwrapped Gymnasium ``MujocoEnv`` (``.model``, ``.data``, ``.set_state``)."""
        return self._raw.single_agent_env.unwrapped

    @property
    def velocity_threshold(self) -> float | None:
        """The speed threshold of the safe family (None without costs)."""
        return None if self._cost_env is None else self._cost_env.threshold

    def step(self, actions: np.ndarray) -> EnvStep:
        st = super().step(actions)
        if self._cost_env is not None:
            # One team cost, repeated per agent: agents share the robot and hence the constraint.
            st.cost = np.full(self.spec.n_agents, self._cost_env.last_cost, np.float32)
        return st

    def render(self) -> np.ndarray:
        """An RGB frame ``[H, W, 3]`` uint8 (``width``/``height`` env parameters, 480 by default).

        Raises:
            RenderUnavailable: no OpenGL backend can be used; the message says what to install.
        """
        if not self._render_checked:  # once: the library lookups spawn ldconfig
            backend, reason = find_gl_backend()
            if backend is None:
                raise RenderUnavailable(reason)
            # Gymnasium's renderer reads MUJOCO_GL when it builds its context; left unset, it would try
            # glfw first, which fails without a display. Only fill it in when the user chose nothing.
            os.environ.setdefault("MUJOCO_GL", backend)
        try:
            frame = self.mujoco_env.mujoco_renderer.render("rgb_array")
        except Exception as e:
            raise RenderUnavailable(
                f"MuJoCo offscreen rendering failed with MUJOCO_GL={os.environ.get('MUJOCO_GL')}: "
                f"{type(e).__name__}: {e}. If the backend is missing: {_GL_HINT}"
            ) from e
        self._render_checked = True
        return np.asarray(frame, np.uint8)


def make_mamujoco(task: str, seed: int | None = None, **params: Any) -> MaMuJoCoEnv:
    """Factory of the ``mamujoco`` family."""
    return MaMuJoCoEnv(task, safe=False, seed=seed, **params)


def make_safe_mamujoco(task: str, seed: int | None = None, **params: Any) -> MaMuJoCoEnv:
    """Factory of the ``safe-mamujoco`` family."""
    return MaMuJoCoEnv(task, safe=True, seed=seed, **params)


PARAMS = {"agent_obsk": Rule(int, ge=0), "episode_limit": Rule(int, ge=1),
          "state": Rule(str, choices=("env", "concat"))}
"""Id parameters and their ranges (:mod:`pamarl.validation`); other parameters go to Gymnasium unchecked."""

register_family(
    EnvFamily(
        name="mamujoco",
        description="Multi-Agent MuJoCo (gymnasium-robotics): mamujoco/<Scenario>-<conf>?agent_obsk=1",
        tasks=TASKS,
        open_tasks=True,
        make_single=make_mamujoco,
        extra="mujoco",
        params=PARAMS,
    )
)
register_family(
    EnvFamily(
        name="safe-mamujoco",
        description=(
            "Multi-Agent MuJoCo with Safety-Gymnasium's velocity cost: safe-mamujoco/<Scenario>-<conf>"
            f"?velocity_threshold=...; default cost limit {DEFAULT_COST_LIMIT:g} per 1000 steps"
        ),
        tasks={k: f"{TASKS.get(k, '')}; cost when speed > {v} m/s" for k, v in VELOCITY_THRESHOLDS.items()},
        open_tasks=True,
        make_single=make_safe_mamujoco,
        extra="mujoco",
        params={**PARAMS, "velocity_threshold": Rule(float, gt=0.0)},
        default_cost_limit=DEFAULT_COST_LIMIT,
        # The same 2.5 % of the steps when ?episode_limit= shortens the episode.
        cost_limit_for=lambda params: scaled_cost_limit(int(params.get("episode_limit", DEFAULT_EPISODE_LIMIT))),
    )
)
