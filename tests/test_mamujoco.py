"""Multi-Agent MuJoCo and safe Multi-Agent MuJoCo env families (needs the ``mujoco`` extra)."""

from __future__ import annotations

import importlib.util
import math
import warnings

import numpy as np
import pytest

# Skip only when the extra is missing (CI installs it). gymnasium_robotics is looked up rather than
# imported here: pamarl.envs.mamujoco imports it with its start-up notices silenced.
pytest.importorskip("mujoco", reason="needs the mujoco extra: pip install 'pamarl[mujoco]'")
if importlib.util.find_spec("gymnasium_robotics") is None:
    pytest.skip("needs the mujoco extra: pip install 'pamarl[mujoco]'", allow_module_level=True)

import torch  # noqa: E402
from pettingzoo.utils.conversions import parallel_to_aec  # noqa: E402

with warnings.catch_warnings():  # pettingzoo.test imports PettingZoo's classic envs the deprecated way
    warnings.simplefilter("ignore", DeprecationWarning)
    from pettingzoo.test import api_test, parallel_api_test

from pamarl.envs import mamujoco as mj  # noqa: E402
from pamarl.envs.registry import families, make_env  # noqa: E402
from pamarl.errors import UsageError  # noqa: E402

pytestmark = pytest.mark.mujoco


def _random_actions(spec, num_envs: int, gen: torch.Generator) -> torch.Tensor:
    lo, hi = (torch.from_numpy(b) for b in spec.padded_bounds())
    return lo + (hi - lo) * torch.rand(num_envs, spec.n_agents, spec.act_dim, generator=gen)


# ------------------------------------------------------------------------------- PettingZoo conformance
# Advisories about MaMuJoCo's own spaces (unbounded Boxes, per-agent sizes), not failures.
@pytest.mark.filterwarnings("ignore:Agent's m:UserWarning")
@pytest.mark.filterwarnings("ignore:Agents have different observation space sizes")
@pytest.mark.filterwarnings("ignore:Observations are different shapes")
@pytest.mark.filterwarnings("ignore:The base environment `MaMuJoCo` does not have a `render_mode`")
@pytest.mark.parametrize(
    "task,safe,params",
    [
        ("HalfCheetah-2x3", False, {}),
        ("Ant-4x2", True, {"agent_obsk": 2}),
        ("Hopper-3x1", True, {}),  # random actions make it fall: covers termination
        ("Humanoid-9|8", True, {}),
        ("ManySegmentSwimmer-4x2", False, {}),
    ],
)
def test_pettingzoo_conformance(task: str, safe: bool, params: dict) -> None:
    # A short time limit so that both tests also see truncation inside their cycle budget.
    parallel_api_test(mj.make_parallel_env(task, safe=safe, episode_limit=40, **params), num_cycles=60)
    # The parallel test does not check that observations lie in their spaces; the AEC test does.
    api_test(
        parallel_to_aec(mj.make_parallel_env(task, safe=safe, episode_limit=40, **params)), num_cycles=60
    )


def test_safe_wrapper_reports_cost_in_infos() -> None:
    env = mj.make_parallel_env("Hopper-3x1", safe=True)
    assert isinstance(env, mj.VelocityCostWrapper)
    env.reset(seed=0)
    for _ in range(5):
        _, _, _, _, infos = env.step({a: env.action_space(a).sample() for a in env.agents})
        costs = {i["cost"] for i in infos.values()}
        assert costs == {env.last_cost} and env.last_cost in (0.0, 1.0)
        assert env.last_cost == float(infos["agent_0"]["speed"] > env.threshold)
        assert infos["agent_0"]["speed"] == pytest.approx(abs(infos["agent_0"]["x_velocity"]))


# ------------------------------------------------------------------------------- specs and shapes
# Sizes as gymnasium-robotics' MaMuJoCo builds them (agent_obsk=1): a change here means upstream changed.
KNOWN = {
    "HalfCheetah-2x3": ((12, 12), (3, 3), 17),
    "HalfCheetah-6x1": ((9, 9, 8, 9, 9, 8), (1,) * 6, 17),
    "Ant-2x4": ((63, 63), (4, 4), 105),
    "Ant-4x2": ((42,) * 4, (2,) * 4, 105),
    "Walker2d-2x3": ((12, 12), (3, 3), 17),
    "Hopper-3x1": ((8, 9, 8), (1, 1, 1), 11),
    "Humanoid-9|8": ((242, 170), (9, 8), 348),
    "ManySegmentSwimmer-10x2": ((5,) + (6,) * 8 + (5,), (2,) * 10, 44),
}


@pytest.mark.parametrize("task", list(KNOWN))
def test_spec_and_shapes(task: str) -> None:
    obs_dims, act_dims, state_dim = KNOWN[task]
    env = make_env(f"mamujoco/{task}", num_envs=2, seed=0)
    try:
        spec = env.spec
        assert spec.obs_dims == obs_dims and spec.action_dims == act_dims and spec.state_dim == state_dim
        assert spec.action_kind == "continuous" and not spec.has_action_mask
        assert spec.team_reward and not spec.has_cost and spec.episode_limit == 1000
        # Bounds come from the robot's actuator ranges (Humanoid: +-0.4).
        penv = mj.make_parallel_env(task)
        assert spec.action_low is not None and spec.action_high is not None
        for i, a in enumerate(penv.possible_agents):
            assert spec.action_low[i] == pytest.approx(penv.action_space(a).low.tolist())
            assert spec.action_high[i] == pytest.approx(penv.action_space(a).high.tolist())
        obs = env.reset(seed=0)
        n, d = spec.n_agents, spec.obs_dim
        assert obs.obs.shape == (2, n, d) and obs.obs.dtype == torch.float32
        assert obs.state.shape == (2, state_dim)
        assert obs.action_mask.shape == (2, n, spec.act_dim) and obs.active.all()
        for i, od in enumerate(obs_dims):
            assert (obs.obs[:, i, od:] == 0).all()  # padding stays zero
        st = env.step(_random_actions(spec, 2, torch.Generator().manual_seed(0)))
        assert st.reward.shape == (2, n) and st.cost is None
        assert torch.equal(st.reward, st.reward[:, :1].expand(2, n))  # one team reward
        assert torch.isfinite(st.next.obs).all()
    finally:
        env.close()


def test_query_params_obsk_state_limit() -> None:
    env = make_env("safe-mamujoco/Ant-2x4?agent_obsk=0&state=concat&episode_limit=300", seed=0)
    try:
        spec = env.spec
        assert spec.has_cost and spec.episode_limit == 300
        assert spec.obs_dims[0] < KNOWN["Ant-2x4"][0][0]  # depth 0 sees fewer joints than depth 1
        assert spec.state_dim == spec.n_agents * spec.obs_dim
        obs = env.reset(seed=1)
        assert torch.equal(obs.state[0], obs.obs[0].reshape(-1))
    finally:
        env.close()


def test_bad_ids_name_the_problem() -> None:
    with pytest.raises(UsageError, match="HalfCheetah"):
        make_env("mamujoco/HalfCheeta-2x3")
    with pytest.raises(UsageError, match="<Scenario>-<conf>"):
        make_env("mamujoco/HalfCheetah2x3")
    with pytest.raises(UsageError, match="cannot build"):
        make_env("mamujoco/HalfCheetah-5x5")
    with pytest.raises(UsageError, match="state"):
        make_env("mamujoco/HalfCheetah-2x3?state=global")
    with pytest.raises(UsageError, match="velocity_threshold"):
        make_env("safe-mamujoco/ManySegmentSwimmer-4x2")
    with pytest.raises(UsageError, match="velocity_threshold"):
        make_env("mamujoco/HalfCheetah-2x3?velocity_threshold=1.0")
    with pytest.raises(UsageError, match="locomotion"):
        make_env("safe-mamujoco/Reacher-2x1?velocity_threshold=1.0")
    with pytest.raises(UsageError, match="agent_obsk"):
        make_env("mamujoco/HalfCheetah-2x3?agent_obsk=-1")
    env = make_env("safe-mamujoco/ManySegmentSwimmer-4x2?velocity_threshold=0.05")
    env.close()


def test_families_registered() -> None:
    fams = families()
    assert fams["mamujoco"].extra == "mujoco" and fams["safe-mamujoco"].extra == "mujoco"
    assert {"HalfCheetah-2x3", "Humanoid-9|8", "ManySegmentSwimmer-10x2"} <= set(fams["mamujoco"].tasks)
    assert set(fams["safe-mamujoco"].tasks) == set(mj.VELOCITY_THRESHOLDS)
    assert mj.DEFAULT_COST_LIMIT == 25.0 == fams["safe-mamujoco"].default_cost_limit
    assert mj.scaled_cost_limit(500) == 12.5


# ------------------------------------------------------------------------------- the cost rule
def test_velocity_rule_on_infos() -> None:
    assert mj.velocity_speed({"x_velocity": -3.0}) == 3.0  # planar robots: |vx|
    assert mj.velocity_speed({"x_velocity": 3.0, "y_velocity": 4.0}) == 5.0
    assert mj.velocity_speed({"x_velocity": -3.0, "y_velocity": 4.0}, signed_x=True) == -3.0  # swimmers
    assert mj.velocity_cost(1.0001, 1.0) == 1.0
    assert mj.velocity_cost(1.0, 1.0) == 0.0  # strictly above the threshold
    assert mj.velocity_cost(-5.0, 1.0) == 0.0


# Free-joint robots move in the plane: their speed includes the y-velocity.
_FREE_ROOT = {"Ant", "Humanoid"}


@pytest.mark.parametrize("task", [t for t in mj.VELOCITY_THRESHOLDS if not t.startswith("Swimmer")])
@pytest.mark.parametrize("factor", [1.02, 0.98])
def test_cost_follows_threshold_on_crafted_states(task: str, factor: float) -> None:
    """Launch the robot in free flight at ``factor * threshold`` and check the cost of that step."""
    env = mj.MaMuJoCoEnv(task, safe=True, seed=0)
    threshold = mj.VELOCITY_THRESHOLDS[task]
    assert env.velocity_threshold == threshold
    env.reset(seed=0)
    m = env.mujoco_env
    qpos, qvel = m.init_qpos.copy(), np.zeros(m.model.nv)
    speed = factor * threshold
    if task.split("-")[0] in _FREE_ROOT:
        qpos[2] += 0.2  # lift clear of the ground, still within the healthy height range
        # At 45 degrees the x-velocity alone stays under the threshold: the rule must use the planar speed.
        qvel[0] = qvel[1] = speed / math.sqrt(2)
    else:
        qpos[1] += 0.3  # rootz of the planar robots
        qvel[0] = -speed  # backwards: the speed is |vx|
    # Joints at their rest angles and no control: in free fall the body only translates, at constant
    # horizontal velocity, so the finite-difference speed over a step is exactly ``speed``.
    m.set_state(qpos, qvel)
    zero = np.zeros((env.spec.n_agents, env.spec.act_dim), np.float32)
    first = env.step(zero)
    assert not (first.terminated or first.truncated) and m.data.ncon == 0
    # The first step's body positions lag one substep behind set_state; the second step is exact.
    st = env.step(zero)
    assert m.data.ncon == 0
    assert env._cost_env is not None and env._cost_env.last_speed == pytest.approx(speed, rel=1e-3)
    expected = 1.0 if factor > 1 else 0.0
    assert st.cost is not None and st.cost.shape == (env.spec.n_agents,) and st.cost.dtype == np.float32
    assert (st.cost == expected).all()
    env.close()


# ------------------------------------------------------------------------------- episode ends
def test_time_limit_is_truncation() -> None:
    env = make_env("mamujoco/HalfCheetah-2x3?episode_limit=10", num_envs=1, seed=0)
    try:
        env.reset(seed=0)
        gen = torch.Generator().manual_seed(0)
        for t in range(1, 11):
            st = env.step(_random_actions(env.spec, 1, gen))
            assert not st.terminated.any()
            assert bool(st.truncated[0]) == (t == 10)
        assert len(st.episodes) == 1 and st.episodes[0].truncated and st.episodes[0].length == 10
        assert not torch.equal(st.final.obs, st.next.obs)  # next is already the new episode
        assert st.final.active.all()
    finally:
        env.close()


def _tip_over(env: mj.MaMuJoCoEnv) -> None:
    """Tilt Hopper's torso beyond its healthy angle range (|angle| < 0.2), so the next step terminates."""
    m = env.mujoco_env
    qpos = m.init_qpos.copy()
    qpos[2] = 0.6
    m.set_state(qpos, np.zeros(m.model.nv))


@pytest.mark.parametrize("episode_limit", [1000, 1])
def test_falling_is_termination(episode_limit: int) -> None:
    # With episode_limit=1 the fall and the time limit coincide: the step still counts as terminated.
    env = mj.MaMuJoCoEnv("Hopper-3x1", safe=True, episode_limit=episode_limit, seed=0)
    env.reset(seed=0)
    _tip_over(env)
    st = env.step(np.zeros((3, 1), np.float32))
    assert st.terminated and not st.truncated
    assert st.active.all() and np.isfinite(st.reward).all() and st.cost is not None
    env.reset(seed=1)  # and the copy is usable again
    st = env.step(np.zeros((3, 1), np.float32))
    assert not st.terminated
    env.close()


# ------------------------------------------------------------------------------- subprocess workers
def test_workers_match_in_process() -> None:
    env_id = "safe-mamujoco/HalfCheetah-2x3?episode_limit=5"
    gen = torch.Generator().manual_seed(0)
    local = make_env(env_id, num_envs=2, seed=0)
    remote = make_env(env_id, num_envs=2, workers=2, seed=0)
    try:
        assert remote.spec == local.spec
        a0, b0 = local.reset(seed=3), remote.reset(seed=3)
        assert torch.equal(a0.obs, b0.obs)
        actions = [_random_actions(local.spec, 2, gen) for _ in range(7)]
        for t, act in enumerate(actions, start=1):
            a, b = local.step(act), remote.step(act)
            assert torch.equal(a.next.obs, b.next.obs) and torch.equal(a.reward, b.reward)
            assert a.cost is not None and b.cost is not None and torch.equal(a.cost, b.cost)
            assert b.cost.shape == (2, 2)
            assert b.truncated.tolist() == [t == 5] * 2
            assert len(b.episodes) == (2 if t == 5 else 0)
    finally:
        local.close()
        remote.close()


# ------------------------------------------------------------------------------- rendering
def test_render_frame_or_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    env = mj.MaMuJoCoEnv("HalfCheetah-2x3", width=64, height=48, seed=0)
    env.reset(seed=0)
    backend, reason = mj.find_gl_backend()
    try:
        if backend is None:
            with pytest.raises(mj.RenderUnavailable, match="OpenGL"):
                env.render()
            pytest.skip(f"cannot check frames here: {reason}")
        monkeypatch.setenv("MUJOCO_GL", backend)
        try:
            frame = env.render()
        except mj.RenderUnavailable as e:  # e.g. libEGL present but no working driver behind it
            pytest.skip(f"OpenGL backend {backend} is installed but unusable here: {e}")
        assert frame.shape == (48, 64, 3) and frame.dtype == np.uint8 and frame.std() > 0
        for _ in range(5):
            env.step(np.ones((2, 3), np.float32))
        assert not np.array_equal(env.render(), frame)  # the renderer follows the simulation
    finally:
        env.close()


def test_render_without_backend_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.delenv("MUJOCO_GL", raising=False)
    monkeypatch.setattr(mj.ctypes.util, "find_library", lambda name: None)
    backend, reason = mj.find_gl_backend()
    assert backend is None
    assert "libegl1" in reason and "libosmesa6" in reason and "MUJOCO_GL" in reason
    env = mj.MaMuJoCoEnv("HalfCheetah-2x3", seed=0)
    with pytest.raises(mj.RenderUnavailable, match="no OpenGL backend"):
        env.render()
    env.close()
    monkeypatch.setenv("MUJOCO_GL", "vulkan")
    assert mj.find_gl_backend() == (
        None,
        "no OpenGL backend: MUJOCO_GL='vulkan' is not one of egl, osmesa, glfw",
    )
