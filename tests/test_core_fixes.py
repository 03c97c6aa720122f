"""Issue 11's correctness fixes: value clipping centred on the collection-time prediction, one reward
convention, any device, refusals that protect HAPPO's guarantee, and HARL-parity options."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import DEVICES, quick_run, update_crashes_at

from pamarl.algos.onpolicy import OnPolicyAlgorithm
from pamarl.algos.registry import get_algorithm
from pamarl.config import TrainConfig, check_device
from pamarl.envs.registry import make_env
from pamarl.errors import UsageError
from pamarl.nets.mlp import AgentMLP
from pamarl.runner import apply_reward_convention, train


# ---------------------------------------------------------------------- 1. value clipping
@pytest.mark.parametrize("algo", ["mappo", "happo", "progressive"])
def test_no_sample_is_frozen_by_the_value_clip_at_the_first_critic_step(tmp_path, monkeypatch, algo):
    """At the first critic step of every iteration the critic's output equals the stored prediction exactly,
    so the clipped branch cannot freeze any sample (before the fix, 44-92% of samples got no gradient)."""
    seen: list[tuple[int, float, float]] = []
    real = OnPolicyAlgorithm.critic_loss
    calls = {"n": 0}

    def spy(self, critic, mb, target, old):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            new = critic.raw(mb.state, mb.obs)
            diff = (new - old).abs() * mb.mask
            frozen = ((diff > self.cfg.value_clip).float() * mb.mask).sum() / mb.mask.sum()
        seen.append((calls["n"], float(diff.max()), float(frozen)))
        calls["n"] += 1
        return real(self, critic, mb, target, old)

    monkeypatch.setattr(OnPolicyAlgorithm, "critic_loss", spy)
    cfg_cls = get_algorithm(algo).Config
    # 2 minibatches x 5 critic epochs = 10 critic steps per iteration; value_norm on (the default).
    train(quick_run(tmp_path, algo=algo, steps=4 * 50 * 4, num_envs=4, rollout_len=50),
          cfg_cls(minibatches=2, hidden=(32, 32)))
    per_iter = 10
    assert len(seen) == 4 * per_iter
    firsts = seen[::per_iter]
    for _, max_diff, frozen in firsts:
        assert max_diff < 1e-5 and frozen == 0.0
    # ... while later steps of an iteration do see the critic move away from the stored prediction (the
    # check above is not vacuous: the spy reads the live network).
    assert max(d for _, d, _ in seen) > 0


# ---------------------------------------------------------------------- 2. reward convention
def test_team_convention_gives_every_agent_the_summed_reward_and_is_logged(tmp_path):
    env = make_env("mpe/simple_spread_v3", num_envs=2, seed=0)
    try:
        env.reset(seed=0)
        st = env.step(torch.zeros(2, env.spec.n_agents, dtype=torch.long))
    finally:
        env.close()
    team = apply_reward_convention(st, "team")
    assert torch.allclose(team.reward, st.reward.sum(-1, keepdim=True).expand_as(st.reward))
    assert apply_reward_convention(st, "individual").reward is st.reward
    assert team.episodes is st.episodes  # reports are untouched

    res = train(quick_run(tmp_path, "t", algo="ippo", steps=200, num_envs=2, rollout_len=100))
    doc = yaml.safe_load((res.run_dir / "config.yaml").read_text())
    assert doc["run"]["reward"] == "auto" and doc["reward_convention"] == "team"
    res = train(quick_run(tmp_path, "mixed", algo="ippo", env="mpe/simple_push_v3", steps=200, num_envs=2,
                          rollout_len=100))
    assert yaml.safe_load((res.run_dir / "config.yaml").read_text())["reward_convention"] == "individual"


def test_reward_key_is_validated():
    with pytest.raises(UsageError, match="reward.*must be one of"):
        from pamarl.config import build

        build(TrainConfig, {"reward": "mean"}, "run")


# ---------------------------------------------------------------------- 3. devices
def test_missing_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the error path cannot be exercised")
    with pytest.raises(UsageError, match="no CUDA GPU"):
        check_device("cuda")
    with pytest.raises(UsageError, match="not a torch device"):
        check_device("gpu0")


# ---------------------------------------------------------------------- 4. refusals
@pytest.mark.parametrize("algo", ["happo", "hatrpo", "progressive", "fixed_ratio"])
def test_sequential_updates_refuse_shared_parameters(algo):
    env = make_env("matrix/penalty", num_envs=2)
    cls = get_algorithm(algo)
    with pytest.raises(UsageError, match="share_params=false"):
        cls(env.spec, cls.Config(share_params=True), TrainConfig(algo=algo), torch.device("cpu"))


# ---------------------------------------------------------------------- 7. parity options
def test_shared_critic_is_one_value_for_the_team(tmp_path):
    env = make_env("mpe/simple_spread_v3", num_envs=2, seed=0)
    cls = get_algorithm("mappo")
    algo = cls(env.spec, cls.Config(critic="shared"), TrainConfig(algo="mappo"), torch.device("cpu"))
    assert algo.critic.n_out == 1 and len(algo.critic_opts) == 1
    obs = env.reset(seed=0)
    v = algo.critic.raw(obs.state, obs.obs)
    assert v.shape == (2, 3) and torch.equal(v[:, 0], v[:, 1]) and torch.equal(v[:, 0], v[:, 2])
    env.close()
    res = train(quick_run(tmp_path, algo="happo", steps=400, num_envs=2, rollout_len=100),
                get_algorithm("happo").Config(critic="shared", input_norm=True))
    assert res.iterations == 2
    prog = get_algorithm("progressive")
    with pytest.raises(UsageError, match="per-agent critics"):
        prog(env.spec, prog.Config(critic="shared"), TrainConfig(algo="progressive"), torch.device("cpu"))
    with pytest.raises(UsageError, match="reward=team"):
        cls(env.spec, cls.Config(critic="shared"), TrainConfig(algo="mappo", reward="individual"),
            torch.device("cpu"))


def test_input_and_hidden_layernorm_batched_equals_per_agent():
    """HARL's LayerNorms (on the input, after each hidden activation), each agent with its own affine."""
    torch.manual_seed(0)
    net = AgentMLP(3, 5, 2, (8, 6), input_norm=True, layer_norm=True)
    for m in net.nets:  # non-trivial LayerNorm affines, different per agent
        for ln in [m.norm, *m.hidden_norms]:
            torch.nn.init.normal_(ln.weight)
            torch.nn.init.normal_(ln.bias)
    x = torch.randn(4, 3, 5)
    out = net(x)
    for i in range(3):
        m = net.nets[i]
        h = m.norm(x[:, i])
        for j, layer in enumerate(m.layers):
            h = layer(h)
            if j < len(m.layers) - 1:
                h = m.hidden_norms[j](torch.relu(h))
        assert torch.allclose(out[:, i], h, atol=1e-5)
    assert torch.allclose(net(x[:, [2, 0]], [2, 0]), out[:, [2, 0]], atol=1e-6)
    assert torch.allclose(net(x[:, [1]], [1]), out[:, [1]], atol=1e-6)
    # Large batches take one 2-D product per agent: same outputs, same gradients as the batched product.
    x.requires_grad_(True)
    out.sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    net.loop_rows = 1
    looped = net(x)
    assert torch.allclose(looped, out, atol=1e-6)
    looped.sum().backward()
    assert all(torch.allclose(p.grad, g, atol=1e-5) for p, g in zip(net.parameters(), grads))


# ---------------------------------------------------------------------- registry-generated runs
def _algo_names() -> list[str]:
    from pamarl.algos.registry import algorithms

    return sorted(algorithms())


def _task_for(name: str) -> str:
    cls = get_algorithm(name)
    if cls.homogeneous_agents_only:
        return "mpe/simple_spread_v3?N=4"
    if "discrete" in cls.action_kinds:  # heterogeneous agents: padded observations and masked padded actions
        return "mpe/simple_speaker_listener_v4"
    return "mpe/simple_spread_v3?continuous=true&N=2"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", _algo_names())
def test_every_algorithm_trains_evaluates_and_resumes_exactly(tmp_path, monkeypatch, name, device):
    """Generated from the registry: every algorithm trains, evaluates, checkpoints and, after a crash,
    resumes bit-exactly on every device present (3 iterations straight == crash in iteration 3 + resume)."""
    import csv

    cls = get_algorithm(name)
    small = {"hidden": (16,)}
    if "learning_starts" in cls.Config.__dataclass_fields__:
        small.update(learning_starts=16, batch_size=16)
    if "checkpoint_replay" in cls.Config.__dataclass_fields__:
        small.update(checkpoint_replay=True)  # exact resume needs the replay (mean-field defaults to false)
    kw = dict(algo=name, env=_task_for(name), num_envs=2, rollout_len=25, eval_every=1, eval_episodes=2,
              checkpoint_every=1, device=device, steps=150)
    full = train(quick_run(tmp_path, "full", **kw), cls.Config(**small))
    assert full.iterations == 3 and "eval/return_mean" in full.final_eval


    cut = quick_run(tmp_path, "cut", **kw)
    # The run dies in iteration 3, after the checkpoint of iteration 2.
    with update_crashes_at(monkeypatch, cls, 3), pytest.raises(KeyboardInterrupt):
        train(cut, cls.Config(**small))
    train(cut, resume=True)

    def rows(d):  # type: ignore[no-untyped-def]
        with open(d / "metrics.csv") as f:
            # Wall-clock columns (wall_s, time/...) are the only ones a rerun may change.
            return [{k: v for k, v in r.items() if k != "wall_s" and not k.startswith("time/")}
                    for r in csv.DictReader(f)]

    assert rows(tmp_path / "cut") == rows(tmp_path / "full")


# ---------------------------------------------------------------------- plug-ins and presets
def test_a_plugin_package_registers_an_algorithm_and_an_env_family(tmp_path, monkeypatch):
    """A package outside pamarl, found through its entry points (an installed dist-info on sys.path)."""
    (tmp_path / "pamarl_fake_plugin.py").write_text(
        "from pamarl.algos.mappo import MAPPO\n"
        "from pamarl.envs.matrix import make_matrix\n"
        "from pamarl.envs.registry import EnvFamily\n\n"
        "class PluginPPO(MAPPO):\n"
        "    name = 'plugin_ppo'\n\n"
        "FAMILY = EnvFamily(name='plugin-matrix', description='a plug-in family', tasks={'penalty': 'p'},\n"
        "                   make_batched=make_matrix)\n"
    )
    dist = tmp_path / "pamarl_fake_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: pamarl-fake-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[pamarl.algorithms]\nplugin_ppo = pamarl_fake_plugin:PluginPPO\n\n"
        "[pamarl.envs]\nplugin-matrix = pamarl_fake_plugin:FAMILY\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from pamarl.algos.registry import algorithms
    from pamarl.envs.registry import families

    assert "plugin_ppo" in algorithms()
    assert "plugin-matrix" in families()
    res = train(quick_run(tmp_path, algo="plugin_ppo", env="plugin-matrix/penalty", steps=64, num_envs=4,
                          rollout_len=16))
    assert res.iterations == 1


@pytest.mark.parametrize("preset,algo", [("harl-mpe", "happo"), ("harl-mpe", "mappo"), ("harl-mamujoco", "happo"),
                                         ("epymarl-qmix", "qmix")])
def test_presets_load_and_are_overridable(preset, algo):
    from pamarl.runner import build_configs

    run, cfg = build_configs({"algo": algo}, preset=preset)
    if algo in ("happo", "mappo"):
        assert cfg.critic == "shared" and cfg.input_norm and run.reward == "team"
        assert cfg.share_params == (algo == "mappo" and preset == "harl-mpe")
    else:
        assert cfg.rnn and cfg.share_params and cfg.target_update_interval == 200
    run, cfg = build_configs({"algo": algo, "lr": 1e-3, "num_envs": 2}, preset=preset)
    assert cfg.lr == 1e-3 and run.num_envs == 2  # the command line wins over the preset
    with pytest.raises(UsageError, match="no settings for algorithm"):
        build_configs({"algo": "maddpg"}, preset=preset)
    with pytest.raises(UsageError, match="unknown preset"):
        build_configs({"algo": algo}, preset="harl")


@pytest.mark.parametrize("algo", ["happo", "mappo"])
def test_mpe_torch_fast_preset(algo):
    """The measured fast configuration of the batched MPE: 128 x 25, one minibatch, doubled learning rates."""
    from pamarl.runner import build_configs

    run, cfg = build_configs({"algo": algo, "env": "mpe-torch/simple_spread_v3"}, preset="mpe-torch-fast")
    assert (run.num_envs, run.rollout_len, run.torch_threads) == (128, 25, 1)
    assert (cfg.minibatches, cfg.lr, cfg.critic_lr, cfg.epochs) == (1, 1e-3, 1e-3, 5)


# ---------------------------------------------------------------------- 5. episode boundaries
class _VariableLengthEnv:
    """A tiny PettingZoo ParallelEnv whose episodes last 2-6 steps at random (terminated, not truncated)."""

    metadata = {"name": "variable_length_v0"}

    def __init__(self, seed: int = 0):
        import numpy as np
        from gymnasium import spaces

        self.possible_agents = ["a", "b"]
        self.agents: list[str] = []
        self._obs_space = spaces.Box(-1.0, 100.0, (2,), dtype=np.float32)
        self._act_space = spaces.Discrete(3)
        self._rng = np.random.default_rng(seed)

    def observation_space(self, agent):  # type: ignore[no-untyped-def]
        return self._obs_space

    def action_space(self, agent):  # type: ignore[no-untyped-def]
        return self._act_space

    def _obs(self):  # type: ignore[no-untyped-def]
        import numpy as np

        return {a: np.array([self.t, i], np.float32) for i, a in enumerate(self.agents)}

    def reset(self, seed=None, options=None):  # type: ignore[no-untyped-def]
        import numpy as np

        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self.agents = list(self.possible_agents)
        self.t, self.length = 0, int(self._rng.integers(2, 7))
        return self._obs(), {a: {} for a in self.agents}

    def step(self, actions):  # type: ignore[no-untyped-def]
        self.t += 1
        done = self.t >= self.length
        obs = self._obs()
        rew = {a: 1.0 for a in self.agents}
        term = {a: done for a in self.agents}
        trunc = {a: False for a in self.agents}
        infos = {a: {} for a in self.agents}
        if done:
            self.agents = []
        return obs, rew, term, trunc, infos

    def close(self) -> None:
        pass


def test_episode_starts_are_flagged_for_variable_length_generic_envs_and_reset_recurrent_states():
    from pamarl.envs.generic import from_parallel_env

    env = from_parallel_env(_VariableLengthEnv, num_envs=3)
    cls = get_algorithm("qmix")
    algo = cls(env.spec, cls.Config(rnn=True, rnn_hidden=8, hidden=(8,)), TrainConfig(algo="qmix", num_envs=3),
               torch.device("cpu"))
    obs = env.reset(seed=1)
    assert obs.first.all()
    ends = 0
    for _ in range(40):
        if algo.h_train is not None:
            assert (algo.h_train != 0).any()  # a state that carries history (the check is not vacuous)
            h_used = algo._hidden(obs.first)  # what act() starts from
            assert (h_used[obs.first] == 0).all()  # reset exactly at episode starts ...
            assert torch.equal(h_used[~obs.first], algo.h_train[~obs.first])  # ... and nowhere else
        out = algo.act(obs)
        st = env.step(out.env_action)
        done = st.terminated | st.truncated
        assert torch.equal(st.next.first, done)  # the next observation starts an episode exactly where one ended
        assert not st.final.first.any()
        ends += int(done.sum())
        obs = st.next
    env.close()
    assert ends >= 10  # episodes of 2-6 steps: the boundaries were really exercised


def test_batch_take_keeps_only_the_asked_fields_and_agents_and_composes():
    """An actor phase selects its fields and agents once, then each minibatch gathers rows of that."""
    from pamarl.buffers.rollout import OnPolicyBatch

    g = torch.Generator().manual_seed(0)
    B, N = 10, 3
    per_agent = {k: torch.randn(B, N, generator=g) for k in ("logp", "mask", "value_old", "ret", "adv")}
    batch = OnPolicyBatch(obs=torch.randn(B, N, 4, generator=g), state=torch.randn(B, 6, generator=g),
                          action_mask=torch.ones(B, N, 5, dtype=torch.bool), active=torch.ones(B, N, dtype=torch.bool),
                          action=torch.randint(0, 5, (B, N), generator=g), policy_adv=torch.randn(B, N, generator=g),
                          **per_agent)
    idx = torch.tensor([7, 2, 5])
    for agents in ([1], [0, 1], [2, 0]):
        mine = batch.take(slice(None), {"obs", "logp", "policy_adv"}, agents)
        mb = mine.take(idx)
        assert torch.equal(mb.obs, batch.obs[idx][:, agents])
        assert torch.equal(mb.logp, batch.logp[idx][:, agents])
        assert mb.state.numel() == 0 and mb.ret.numel() == 0  # left out, and stays out
