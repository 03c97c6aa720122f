"""MAgent2 battles: the batched per-team wrapper, deaths, opponents, sides; MF-Q, IL, MF-AC and AC beat a random team;
`pamarl battle` (pooled runs, presets)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("magent2", reason="needs the magent extra: pip install 'pamarl[magent]'")

from pamarl.envs.magent import MAgentEnv, winner  # noqa: E402
from pamarl.envs.registry import make_env  # noqa: E402
from pamarl.errors import UsageError  # noqa: E402

SMALL = "magent2/battle_v4?map_size=20&max_cycles=60"
SMOKE_ENV = "magent2/battle_v4?map_size=20&max_cycles=40"


def _stay(env: MAgentEnv) -> torch.Tensor:
    d = env.moves(0)
    stay = int(((d == 0).all(1)).nonzero()[0][0])
    return torch.full((env.num_envs, env.spec.n_agents), stay)


def test_spec_and_observation_layout() -> None:
    env = make_env(SMALL, num_envs=2, seed=0)
    assert isinstance(env, MAgentEnv)
    s = env.spec
    lay = s.obs_layout
    assert lay is not None and lay.view == (13, 13, 5) and lay.grid == 20
    assert s.n_agents == 12 and s.act_dim == 21 and s.obs_dim == 13 * 13 * 5 + 2 and not s.team_reward
    o = env.reset(seed=0)
    assert o.obs.shape == (2, 12, s.obs_dim) and bool(o.active.all()) and bool(o.first.all())
    pos = (o.obs[..., -2:] * 20).round()
    assert len({tuple(p) for p in pos[0].tolist()}) == 12  # one agent per cell
    env.close()


def test_deaths_are_terminal_for_the_agent_and_the_episode_ends_when_a_side_is_wiped_out() -> None:
    env = make_env("magent2/battle_v4?map_size=20&max_cycles=300&opponent=script", num_envs=1, seed=0)
    obs = env.reset(seed=0)
    stay = _stay(env)
    seen_death = False
    for _ in range(200):
        st = env.step(stay)
        died = obs.active & ~st.final.active
        if bool(died.any()) and not bool(st.terminated.any()):
            seen_death = True
            # the dying agent's reward of that step includes the death penalty; it stays inactive after
            assert bool((st.reward[died] < 0).all())
            assert not bool((st.next.active & died).any())
        if bool(st.terminated.any()):
            assert int(st.final.active.sum()) == 0  # the still team was wiped out by the script
            assert bool(st.next.active.all()) and bool(st.next.first.all())  # already the next episode
            break
        obs = st.next
    else:
        pytest.fail("the scripted team never wiped out a team that stands still")
    assert seen_death
    out = env.outcomes[-1]
    assert out["win"] == 0.0 and out["deaths"] == 12 and out["learner_alive"] == 0
    env.close()


def test_step_limit_truncates_and_sides_swap() -> None:
    env = make_env("magent2/battle_v4?map_size=20&max_cycles=5", num_envs=2, seed=0)
    assert isinstance(env, MAgentEnv)
    env.reset(seed=0)
    sides = env.side.copy()
    for _ in range(5):
        st = env.step(torch.zeros(2, 12, dtype=torch.long))
    assert bool(st.truncated.all()) and not bool(st.terminated.any()) and len(st.episodes) == 2
    assert (env.side == 1 - sides).all() and sides.tolist() == [0, 1]
    env.close()


def test_opponents_and_options() -> None:
    # the scripted opponent beats a random team clearly
    env = make_env(SMALL + "&opponent=random", num_envs=2, seed=1)
    assert isinstance(env, MAgentEnv)
    from pamarl.envs.magent_opponents import ScriptOpponent

    env.opponent = ScriptOpponent(env)
    env.reset(seed=1)
    g = torch.Generator().manual_seed(0)
    while len(env.outcomes) < 4:
        env.step(torch.randint(0, 21, (2, 12), generator=g))
    assert sum(o["win"] for o in env.outcomes[:4]) == 0 and sum(o["deaths"] for o in env.outcomes[:4]) >= 30
    env.close()
    with pytest.raises(UsageError, match="unknown opponent"):
        make_env(SMALL + "&opponent=ghost")
    with pytest.raises(UsageError, match="symmetric"):
        make_env("magent2/tiger_deer_v4?opponent=self")
    with pytest.raises(UsageError, match="unknown option"):
        make_env(SMALL + "&kill_reward=3")
    with pytest.raises(UsageError, match="at least"):
        make_env("magent2/battlefield_v5?map_size=20")
    with pytest.raises(UsageError, match="checkpoint"):
        make_env(SMALL + "&opponent=checkpoint:/nonexistent")


@pytest.mark.parametrize("task", ["battlefield_v5", "adversarial_pursuit_v4", "gather_v5", "tiger_deer_v4"])
def test_other_tasks_step(task: str) -> None:
    env = make_env(f"magent2/{task}?max_cycles=3&map_size={50 if task == 'battlefield_v5' else 30}", num_envs=2, seed=0)
    obs = env.reset(seed=0)
    for _ in range(3):
        st = env.step(torch.randint(0, env.spec.act_dim, (2, env.spec.n_agents)))
    assert bool(st.truncated.all()) and len(st.episodes) == 2 and obs.obs.shape[1] == env.spec.n_agents
    env.close()


def test_winner_rule() -> None:
    assert winner((3, 2)) == 1.0 and winner((0, 1)) == 0.0
    assert winner((2, 2), (5.0, 4.0)) == 1.0 and winner((2, 2), (4.0, 4.0)) == 0.5


def test_battle_smoke_preset_writes_tables_plot_and_gif(tmp_path) -> None:
    from pamarl.cli import main

    out = tmp_path / "battle"
    assert main(["battle", "--preset", "smoke", "--out", str(out), "--render", str(out / "b.gif")]) == 0
    for f in ("battle.csv", "summary.csv", "summary.md", "b.gif"):
        assert (out / f).is_file()
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("a,b,episodes,win,win_ci95") and len(rows) == 3
    # the scripted team beats the random one from both sides
    assert rows[2].startswith("script,random,2,1.0")
    assert main(["battle", "random"]) == 2  # a tournament needs two entrants


def test_battle_pools_the_runs_of_an_entrant_every_model_meets_every_model(tmp_path) -> None:
    """``NAME=DIR1,DIR2``: each of the entrant's models plays the same games against each model of the other
    entrant; the summary pools them and breaks A's win rate down per model."""
    import csv

    from conftest import quick_run

    from pamarl.cli import main
    from pamarl.runner import train

    dirs = []
    for seed in (1, 2):
        run = quick_run(tmp_path, f"m{seed}", algo="il", env=SMOKE_ENV, steps=40, num_envs=1, rollout_len=20,
                        eval_episodes=1, seed=seed)
        dirs.append(str(train(run, quiet=True).run_dir))
    out = tmp_path / "battle"
    argv = ["battle", f"il={dirs[0]},{dirs[1]}", "random", "script", "--env", SMOKE_ENV, "--episodes", "1",
            "--seeds", "1,2", "--out", str(out)]
    assert main(argv) == 0
    rows = list(csv.DictReader((out / "battle.csv").read_text().splitlines()))
    il_vs_random = [r for r in rows if (r["a"], r["b"]) == ("il", "random")]
    assert sorted((r["a_model"], r["seed"]) for r in il_vs_random) == sorted(
        (d, s) for d in dirs for s in ("1.0", "2.0"))  # both models, both env seeds, one episode each
    script_vs_il = [r for r in rows if (r["a"], r["b"]) == ("script", "il")]
    assert sorted(r["b_index"] for r in script_vs_il) == ["0", "0", "1", "1"]
    summary = {(r["a"], r["b"]): r for r in csv.DictReader((out / "summary.csv").read_text().splitlines())}
    s = summary[("il", "random")]
    assert s["episodes"] == "4" and len(s["win_by_model"].split("/")) == 2
    per_model = [sum(float(r["win"]) for r in il_vs_random if r["a_model"] == d) / 2 for d in dirs]
    assert s["win_by_model"] == "/".join(f"{x:.2f}" for x in per_model)
    assert summary[("random", "script")]["episodes"] == "2" and summary[("random", "script")]["win_by_model"].count(
        "/") == 0
    assert "per model of A" in (out / "summary.md").read_text()
    assert main(["battle", f"il={dirs[0]},{dirs[0]}", "random", "--env", SMOKE_ENV]) == 2  # a run named twice
    assert main(["battle", f"il={dirs[0]},{tmp_path / 'nope'}", "random", "--env", SMOKE_ENV]) == 2


def test_battle_paper_preset_plans_a_shortened_run_with_its_measured_time(tmp_path, capsys) -> None:
    from pamarl.battle import PAPER_SECONDS_PER_ROUND, paper_estimate_s
    from pamarl.cli import main

    assert main(["battle", "--preset", "paper", "--rounds", "3", "--episodes", "2", "--seeds", "1",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("steps=1200") == 4 and "x 3 self-play rounds" in out and "measured" in out
    train_s, battle_s = paper_estimate_s(2000, 20, 3)
    assert train_s == 2000 * sum(PAPER_SECONDS_PER_ROUND.values()) > 0 and battle_s > 0
    assert main(["battle", "--preset", "paper", "--rounds", "0"]) == 2


def _play_vs_random(policy, env_id: str, episodes: int, seed: int) -> dict[str, float]:
    """Greedy ``policy`` (None: uniform random actions) against the env's random opponent."""
    env = make_env(env_id + "&opponent=random", num_envs=4, seed=seed)
    obs = env.reset(seed=seed)
    g = torch.Generator().manual_seed(seed)
    while len(env.outcomes) < episodes:
        if policy is None:
            a = torch.randint(0, env.spec.act_dim, (4, env.spec.n_agents), generator=g)
        else:
            with torch.no_grad():
                a = policy.act(obs, explore=False).env_action
        obs = env.step(a).next
    out = env.outcomes[:episodes]
    env.close()
    return {k: sum(o[k] for o in out) / episodes for k in ("win", "kills", "deaths")}


@pytest.mark.parametrize("name", ["mfq", "il"])
def test_learns_to_beat_a_random_team(name: str, tmp_path) -> None:
    """12 v 12 on a 20x20 map, 4,000 env steps: the greedy team wins nearly every battle against random
    soldiers and kills some of them without losses; random soldiers do neither. Measured on this budget:
    seed 1: MF-Q wins 0.94 with 5.4 kills, IL 1.0 with 12; seed 2: MF-Q 1.0 with 1.9 kills, IL 1.0 with 10."""
    from conftest import quick_run

    from pamarl.algos.registry import get_algorithm
    from pamarl.checkpoint import load_checkpoint
    from pamarl.config import build
    from pamarl.runner import make_algorithm, train

    env_id = "magent2/battle_v4?map_size=20&max_cycles=100"
    cfg = build(get_algorithm(name).Config, dict(conv_channels=[16], embed=64, lr=1e-3, tau=0.05, batch_size=128,
                                                  temp_anneal_steps=2000, temp_finish=0.05, learning_starts=500,
                                                  agent_steps_per_update=32), name)
    run = quick_run(tmp_path, algo=name, env=env_id, steps=4000, num_envs=4, rollout_len=25, eval_episodes=1, seed=1)
    res = train(run, cfg, quiet=True)
    algo = make_algorithm(run, cfg, make_env(env_id).spec)
    algo.load_state_dict(load_checkpoint(res.run_dir / "checkpoints" / "final.pt")["algo"])
    learned = _play_vs_random(algo, env_id, 8, seed=123)
    baseline = _play_vs_random(None, env_id, 8, seed=123)
    assert baseline["kills"] < 1.0
    assert learned["win"] >= 0.8, learned
    assert learned["kills"] >= baseline["kills"] + 1.5 and learned["deaths"] <= 1.0, (learned, baseline)


@pytest.mark.parametrize("name", ["mfac", "ac"])
def test_actor_critics_learn_to_beat_a_random_team(name: str, tmp_path) -> None:
    """MF-AC and AC with their defaults (all-actions actor gradient, replayed critic and actor steps) and an
    entropy weight of 0.2, 12 v 12 on a 20x20 map, 8,000 env steps against random soldiers: the greedy team wins
    and kills. Measured (greedy, 8 episodes): MF-AC seed 1 wins 1.0 with 6.9 kills, seed 2 1.0 with 11.1; AC seed 1
    1.0 with 11.0. The paper's sampled gradient with the same replayed critic steps wins 0.12 with no kills (the
    critic learns the hit, the actor does not follow); at 4,000 env steps MF-AC does not fight yet (0.06)."""
    from conftest import quick_run

    from pamarl.algos.registry import get_algorithm
    from pamarl.checkpoint import load_checkpoint
    from pamarl.config import build
    from pamarl.runner import make_algorithm, train

    env_id = "magent2/battle_v4?map_size=20&max_cycles=100"
    cfg = build(get_algorithm(name).Config, dict(conv_channels=[16], embed=64, lr=1e-3, ent_coef=0.2), name)
    run = quick_run(tmp_path, algo=name, env=env_id, steps=8000, num_envs=4, rollout_len=25, eval_episodes=1, seed=1,
                    torch_threads=1)
    res = train(run, cfg, quiet=True)
    algo = make_algorithm(run, cfg, make_env(env_id).spec)
    algo.load_state_dict(load_checkpoint(res.run_dir / "checkpoints" / "final.pt")["algo"])
    learned = _play_vs_random(algo, env_id, 8, seed=123)
    assert learned["win"] >= 0.8, learned
    assert learned["kills"] >= 3.0 and learned["deaths"] <= 1.0, learned


def test_bench_counts_engine_agent_steps_on_magent_only(tmp_path) -> None:
    from pamarl.bench import _loop_steps_per_s, raw_engine_agent_steps

    # the training loop's own rate: the last metrics row, timed before the final evaluation and checkpoint
    (tmp_path / "m.csv").write_text("iteration,env_steps,wall_s\n1,100,2.0\n2,200,8.0\n")
    assert _loop_steps_per_s(tmp_path / "m.csv") == 25.0

    assert raw_engine_agent_steps("mpe/simple_spread_v3", 5) is None
    v = raw_engine_agent_steps("magent2/battle_v4?map_size=20&max_cycles=10", 20)
    assert v is not None and v > 0


def test_self_play_opponent_is_a_lagged_copy_refreshed_by_rule() -> None:
    from pamarl.algos.mfq import MFQ, MFQConfig
    from pamarl.config import TrainConfig, build
    from pamarl.envs.magent_opponents import PolicyOpponent

    env = make_env("magent2/battle_v4?map_size=20&max_cycles=2&opponent=self&self_refresh=2&self_pool=2",
                   num_envs=1, seed=0)
    assert isinstance(env, MAgentEnv) and isinstance(env.opponent, PolicyOpponent)
    cfg = build(MFQConfig, {"conv_channels": [4], "embed": 8, "mean_embed": 4, "hidden": [8]}, "mfq")
    learner = MFQ(env.spec, cfg, TrainConfig(algo="mfq", num_envs=1), torch.device("cpu"))
    env.attach_learner(learner)
    opp = env.opponent
    w0 = opp.algo.qnet.head[0].weight.clone()
    assert torch.equal(w0, learner.qnet.head[0].weight)  # starts as a copy
    with torch.no_grad():
        learner.qnet.head[0].weight.add_(1.0)  # the learner moves on
    obs = env.reset(seed=0)
    for _ in range(2):  # one episode: no refresh yet
        obs = env.step(learner.act(obs).env_action).next
    assert opp.refreshes == 1 and torch.equal(opp.algo.qnet.head[0].weight, w0)
    for _ in range(2):  # the second finished episode refreshes: the pool holds the newest snapshot only
        obs = env.step(learner.act(obs).env_action).next
    assert opp.refreshes == 2 and len(opp.pool) == 1
    assert torch.equal(opp.algo.qnet.head[0].weight, learner.qnet.head[0].weight)
    env.close()


def _roll(env_id: str, workers: int, steps: int) -> tuple[list[torch.Tensor], list[dict[str, float]], list[int]]:
    env = make_env(env_id, num_envs=3, workers=workers, seed=4)
    obs = env.reset(seed=4)
    g = torch.Generator().manual_seed(0)
    out = [obs.obs.clone(), obs.state.clone()]
    for _ in range(steps):
        st = env.step(torch.randint(0, env.spec.act_dim, (3, env.spec.n_agents), generator=g))
        out += [st.next.obs, st.final.obs, st.reward, st.final.active, st.next.active, st.next.first, st.terminated,
                st.truncated, st.next.state, st.final.state]
    outcomes, side = list(env.outcomes), env.side.tolist()
    env.close()
    return out, outcomes, side


@pytest.mark.parametrize("opponent", ["random", "script"])
def test_subprocess_workers_give_the_same_steps_as_in_process(opponent: str) -> None:
    """env_workers=2 (copies 0 and 1-2 in two spawned processes) steps exactly as one in-process env: the
    random opponent draws in the learner's process, the scripted one in the workers."""
    env_id = f"magent2/battle_v4?map_size=20&max_cycles=40&opponent={opponent}"
    a, b = _roll(env_id, 0, 90), _roll(env_id, 2, 90)
    assert len(a[1]) >= 6 and a[1] == b[1] and a[2] == b[2]
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0]))


def test_subprocess_workers_train_self_play_like_in_process(tmp_path) -> None:
    """A short MF-Q self-play run (the opponent is refreshed from the learner, in the learner's process) gives
    the same metrics with env_workers=2 as with env_workers=0."""
    import csv

    from conftest import quick_run

    from pamarl.algos.registry import get_algorithm
    from pamarl.config import build
    from pamarl.runner import train

    env_id = "magent2/battle_v4?map_size=20&max_cycles=30&opponent=self&self_refresh=2"
    cfg = build(get_algorithm("mfq").Config, dict(conv_channels=[4], embed=16, mean_embed=8, hidden=[16],
                                                   batch_size=32, learning_starts=100, agent_steps_per_update=64,
                                                   buffer_size=5000), "mfq")
    rows = []
    for w in (0, 2):
        run = quick_run(tmp_path, name=f"w{w}", algo="mfq", env=env_id, steps=240, num_envs=3, rollout_len=10,
                        eval_episodes=1, seed=3, env_workers=w)
        res = train(run, cfg, quiet=True)
        with open(res.run_dir / "metrics.csv") as f:
            rows.append([{k: v for k, v in r.items() if k != "wall_s"} for r in csv.DictReader(f)])
    assert len(rows[0]) >= 8 and rows[0] == rows[1]
    assert float(rows[0][-1]["train/updates"]) > 10 and any(r["train/return_mean"] for r in rows[0])
