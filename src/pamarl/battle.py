"""``pamarl battle``: a cross-play tournament of trained models and baselines on MAgent2 battles.

Entrants are ``random``, ``script`` (attack the weakest enemy in range, else close in) or ``NAME=RUN_DIR``
(a trained pamarl run; its ``checkpoints/final.pt``). ``NAME=DIR1,DIR2,...`` pools several runs of one entrant
(e.g. training seeds): every model of A meets every model of B, each such model pairing playing the same
games (``--episodes`` per env seed), and the entrant's results pool all of them. Every ordered pair (A, B) with
A != B plays ``--episodes`` episodes per env seed and model pairing, A as the env's learning team and B as its
opponent; the env swaps the two sides (red/left, blue/right) between episodes, so each pairing is played from
both sides. Models act greedily (``--sample``: sample from their policies).

Win rule (:func:`pamarl.envs.magent.winner`): a side wins when the other is wiped out; at the step limit,
the side with more survivors wins, then the one with more total HP; otherwise a draw (counted 0.5).
Reported per pair: win rate, kills (enemies dead at the end), deaths, team return, each with a 95%
interval over episodes (normal approximation, 1.96 standard errors; all env seeds and model pairings pooled).
Games of one trained model are not independent draws of the algorithm, so with pooled runs the summary also
gives A's win rate per model of A (``win_by_model``: over all of B's models) and a 95% interval over those
per-model rates (``win_model_ci95``, 1.96 standard errors over A's models: the training-seed spread).
Writes ``battle.csv`` (one row per episode, with the models that played: ``a_model``, ``b_model``, their
index in the entrant's list), ``summary.csv`` and ``summary.md`` (one row per pair), ``winrate.png``
(matrix), and with ``--render FILE.gif`` a recording of the first pair's first episode (first models).

Presets: ``--preset smoke`` (random vs script on a 20x20 map, seconds; run by the tests) and ``--preset
paper`` (Yang et al. 2018: 64 v 64 on a 40x40 map, 2000 self-play rounds of up to 400 steps per algorithm
for MF-Q, MF-AC, IL and AC, then cross-play). ``--preset paper`` prints the plan and its running time, from
seconds per round measured on the project's 2-core machine (:data:`PAPER_SECONDS_PER_ROUND`; ``--probe``
re-measures on this machine with a one-round run of each algorithm); ``--train`` runs it; ``--rounds N`` runs a
shortened version (N rounds per algorithm instead of 2000).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pamarl.errors import UsageError

PAPER_ENV = "magent2/battle_v4?map_size=40&max_cycles=400"
PAPER_ALGOS = ("mfq", "mfac", "il", "ac")
PAPER_ROUNDS = 2000
PAPER_SECONDS_PER_ROUND = {"mfq": 13.4, "mfac": 13.5, "il": 13.7, "ac": 12.8}
"""Measured wall seconds per 400-step self-play round of the paper preset's training (algorithm defaults, one
process at a time): the mean of rounds 2-10 (MF-Q, MF-AC) or 2-4 (IL, AC) of the preset's own commands, on the
project's 2-core machine shared with other jobs (load average 4-5). In CPU seconds about 8 per round for MF-Q and
IL and 10 for MF-AC and AC (the README)."""
PAPER_SECONDS_PER_EPISODE = 18.3
"""Measured wall seconds per cross-play episode of the paper preset (64 v 64 for the full 400 steps, greedy
models, four episodes at a time; 8 episodes of MF-Q against MF-AC after 10 rounds each, same machine)."""
PAPER_MEASURED = "measured 2026-11-25 on the project's 2-core machine, shared with other jobs"
SMOKE_ENV = "magent2/battle_v4?map_size=20&max_cycles=40"
SMOKE_ENTRANTS = ("random", "script")
SMOKE_EPISODES = 2


@dataclasses.dataclass
class Entrant:
    name: str
    kind: str  # random | script | model
    path: str | None = None
    """The run directory of a model entrant (the first, where it pools several)."""
    pool: tuple[str, ...] = ()
    """Every run directory of a pooled model entrant (``NAME=DIR1,DIR2``); empty means ``(path,)``."""

    def models(self) -> list[Entrant]:
        """One single-model entrant per run directory (itself for random, script and single runs)."""
        if self.kind != "model" or len(self.pool) < 2:
            return [self]
        return [Entrant(self.name, "model", p) for p in self.pool]


def parse_entrant(text: str) -> Entrant:
    if text in ("random", "script"):
        return Entrant(text, text)
    name, sep, paths = text.partition("=")
    if not sep or not name or not paths:
        raise UsageError(f"entrant {text!r}: write random, script, NAME=RUN_DIR or NAME=RUN_DIR1,RUN_DIR2,...")
    pool = tuple(p for p in paths.split(",") if p)
    for path in pool:
        if not Path(path).is_dir():
            raise UsageError(f"entrant {name!r}: {path!r} is not a run directory")
    if len(set(pool)) != len(pool):
        raise UsageError(f"entrant {name!r} names a run directory twice: {paths!r}")
    return Entrant(name, "model", pool[0], pool)


def mean_ci(x: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% interval (1.96 standard errors; 0 for one value)."""
    a = np.asarray(x, np.float64)
    if len(a) < 2:
        return float(a.mean()) if len(a) else float("nan"), 0.0
    return float(a.mean()), float(1.96 * a.std(ddof=1) / math.sqrt(len(a)))


def _opponent_id(env_id: str, b: Entrant, sample: bool) -> str:
    opp = f"checkpoint:{b.path}" if b.kind == "model" else b.kind
    sep = "&" if "?" in env_id else "?"
    return f"{env_id}{sep}opponent={opp}&opponent_explore={str(sample).lower()}"


def play(env_id: str, a: Entrant, b: Entrant, episodes: int, seed: int, sample: bool = False,
         render: str | None = None, max_steps: int = 1_000_000) -> list[dict[str, float]]:
    """``episodes`` finished episodes of ``a`` (learning side) against ``b`` (opponent side)."""
    from pamarl.envs.magent import MAgentEnv
    from pamarl.envs.magent_opponents import Opponent, ScriptOpponent, load_policy
    from pamarl.envs.registry import make_env

    n_envs = 1 if render else max(1, min(episodes, 4))
    env = make_env(_opponent_id(env_id, b, sample), num_envs=n_envs, seed=seed)
    if not isinstance(env, MAgentEnv) or not env.two_teams:
        raise UsageError(f"pamarl battle needs a two-team magent2 task, not {env_id!r}")
    policy: Any = None
    if a.kind == "model":
        assert a.path is not None
        policy = load_policy(a.path, env, role=0)
    rand = Opponent(env)
    script = ScriptOpponent(env, role=0)
    frames: list[Any] = []
    try:
        obs = env.reset(seed=seed)
        rand.seed(seed + 1)
        for _ in range(max_steps):
            if len(env.outcomes) >= episodes:
                break
            if policy is not None:
                with torch.no_grad():
                    act = policy.act(obs, explore=sample).env_action
            elif a.kind == "script":
                act = torch.as_tensor(script.act(env))
            else:
                act = torch.as_tensor(rand.rng.integers(0, env.n_actions, size=(env.num_envs, env.n)))
            if render:
                f = env.render(0)
                if f is not None:
                    frames.append(f)
            obs = env.step(act).next
            if render and env.outcomes:
                break
        out = env.outcomes[:episodes]
    finally:
        env.close()
    if render:
        import imageio.v2 as imageio

        Path(render).parent.mkdir(parents=True, exist_ok=True)
        imageio.mimsave(render, frames, duration=0.1, loop=0)
    return [{**o, "seed": float(seed)} for o in out]


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per ordered pair: means and 95% intervals over its episodes, and A's win rate per model of A
    with the interval over those rates (see the module's docstring)."""
    pairs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        pairs.setdefault((r["a"], r["b"]), []).append(r)
    out = []
    for (a, b), rs in pairs.items():
        row: dict[str, Any] = {"a": a, "b": b, "episodes": len(rs)}
        for key in ("win", "kills", "deaths", "return"):
            m, h = mean_ci([float(r[key]) for r in rs])
            row[key] = round(m, 4)
            row[key + "_ci95"] = round(h, 4)
        by_model: dict[int, list[float]] = {}
        for r in rs:
            by_model.setdefault(int(r.get("a_index", 0)), []).append(float(r["win"]))
        rates = [float(np.mean(by_model[i])) for i in sorted(by_model)]
        row["win_by_model"] = "/".join(f"{x:.2f}" for x in rates)
        row["win_model_ci95"] = round(mean_ci(rates)[1], 4)
        out.append(row)
    return out


def write_tables(out_dir: Path, rows: list[dict[str, Any]], summary: list[dict[str, Any]], env_id: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in (("battle.csv", rows), ("summary.csv", summary)):
        with open(out_dir / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(data[0]))
            w.writeheader()
            w.writerows(data)
    pooled = any("/" in s["win_by_model"] for s in summary)
    head = "| A | B | episodes | win rate of A | kills by A | deaths of A | return of A |"
    rule = "|---|---|---:|---:|---:|---:|---:|"
    if pooled:
        head += " win rate per model of A | ± over models |"
        rule += "---|---:|"
    lines = [f"Cross-play on `{env_id}` (A plays the learning side, B the opponent; sides swap every episode; "
             "95% intervals over episodes" + ("; per model of A: its win rate over all of B's models, and the 95% "
                                              "interval over those rates" if pooled else "") + ").", "", head, rule]
    for s in summary:
        line = (f"| {s['a']} | {s['b']} | {s['episodes']} | {s['win']:.2f} ± {s['win_ci95']:.2f} | "
                f"{s['kills']:.1f} ± {s['kills_ci95']:.1f} | {s['deaths']:.1f} ± {s['deaths_ci95']:.1f} | "
                f"{s['return']:.1f} ± {s['return_ci95']:.1f} |")
        if pooled:
            line += f" {s['win_by_model']} | {s['win_model_ci95']:.2f} |"
        lines.append(line)
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")


def plot_matrix(out_dir: Path, names: list[str], summary: list[dict[str, Any]]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    m = np.full((len(names), len(names)), np.nan)
    for s in summary:
        m[names.index(s["a"]), names.index(s["b"])] = s["win"]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.0 * len(names) + 1.5))
    im = ax.imshow(m, vmin=0, vmax=1, cmap="RdBu")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("opponent (B)")
    ax.set_ylabel("player (A)")
    for i in range(len(names)):
        for j in range(len(names)):
            if not np.isnan(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center")
    fig.colorbar(im, label="win rate of A")
    fig.tight_layout()
    path = out_dir / "winrate.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def tournament(env_id: str, entrants: list[Entrant], episodes: int, seeds: list[int], out_dir: Path,
               sample: bool = False, render: str | None = None, quiet: bool = False) -> list[dict[str, Any]]:
    if len(entrants) < 2:
        raise UsageError("a tournament needs at least two entrants")
    names = [e.name for e in entrants]
    if len(set(names)) != len(names):
        raise UsageError(f"entrant names must differ: {names}")
    rows: list[dict[str, Any]] = []
    for a in entrants:
        for b in entrants:
            if a is b:
                continue
            for i, am in enumerate(a.models()):
                for j, bm in enumerate(b.models()):
                    for s in seeds:
                        t0 = time.perf_counter()
                        res = play(env_id, am, bm, episodes, s, sample)
                        rows += [{"a": a.name, "b": b.name, "a_model": am.path or am.kind, "a_index": i,
                                  "b_model": bm.path or bm.kind, "b_index": j, **r} for r in res]
                        if not quiet:
                            print(f"{a.name}[{i}] vs {b.name}[{j}] seed {s}: win "
                                  f"{np.mean([r['win'] for r in res]):.2f} ({time.perf_counter() - t0:.1f} s)",
                                  file=sys.stderr)
    summary = summarise(rows)
    write_tables(out_dir, rows, summary, env_id)
    plot_matrix(out_dir, names, summary)
    if render:
        play(env_id, entrants[0].models()[0], entrants[1].models()[0], 1, seeds[0], sample, render=render)
    return summary


def paper_commands(out_root: Path, rounds: int = PAPER_ROUNDS) -> list[list[str]]:
    """The paper preset's training commands: ``rounds`` self-play rounds of 400 steps per algorithm (an episode
    that ends early resets inside its round, so this is at least ``rounds`` episodes)."""
    env = PAPER_ENV + "&opponent=self"
    return [["pamarl", "train", "--algo", algo, "--env", env, f"steps={rounds * 400}", "num_envs=1",
             "rollout_len=400", f"run_dir={out_root / algo}", "eval_every=0", "checkpoint_every=25"]
            for algo in PAPER_ALGOS]


def paper_estimate_s(rounds: int, episodes: int, seeds: int) -> tuple[float, float]:
    """Training and cross-play seconds of the paper preset from the measured rates (one run at a time)."""
    train_s = rounds * sum(PAPER_SECONDS_PER_ROUND.values())
    n = len(PAPER_ALGOS) + 1  # the cross-play adds random soldiers
    return train_s, n * (n - 1) * episodes * seeds * PAPER_SECONDS_PER_EPISODE


def probe_seconds_per_round() -> dict[str, float]:
    """Seconds per round of each algorithm on this machine now, from a one-round run each (the loop's own
    time: the final evaluation episode and checkpoint are left out)."""
    import tempfile

    from pamarl.bench import _loop_steps_per_s
    from pamarl.config import TrainConfig
    from pamarl.runner import train

    out = {}
    for algo in PAPER_ALGOS:
        with tempfile.TemporaryDirectory() as tmp:
            run = TrainConfig(algo=algo, env=PAPER_ENV + "&opponent=self", steps=400, num_envs=1, rollout_len=400,
                              eval_every=0, eval_episodes=1, progress=False, tensorboard=False, run_dir=tmp)
            res = train(run, quiet=True)
            out[algo] = 400 / _loop_steps_per_s(res.run_dir / "metrics.csv")
    return out


def paper_preset(out: Path, rounds: int, episodes: int, seeds: list[int], probe: bool, run_it: bool, sample: bool,
                 render: str | None) -> int:
    if rounds < 1:
        raise UsageError(f"--rounds must be >= 1, got {rounds}")
    cmds = paper_commands(out / "runs", rounds)
    train_s, battle_s = paper_estimate_s(rounds, episodes, len(seeds))
    how = PAPER_MEASURED
    if probe:
        rates = probe_seconds_per_round()
        train_s = rounds * sum(rates.values())
        how = "probed just now on this machine, one round each: " + ", ".join(f"{a} {v:.1f} s" for a, v in
                                                                             rates.items())
    print(f"paper preset: {len(PAPER_ALGOS)} algorithms x {rounds} self-play rounds of up to 400 steps on "
          f"{PAPER_ENV}, then cross-play of {episodes} episodes x {len(seeds)} seeds per ordered pair.\n"
          f"estimated time, one run at a time: training {train_s / 3600:.1f} h + cross-play {battle_s / 3600:.1f} h "
          f"({how}; per round: " + ", ".join(f"{a} {v:.1f} s" for a, v in PAPER_SECONDS_PER_ROUND.items()) +
          f"; per cross-play episode {PAPER_SECONDS_PER_EPISODE:.1f} s; rounds whose battle ends early are shorter)")
    for c in cmds:
        print("  " + " ".join(f'"{x}"' if "?" in x else x for x in c))
    if not run_it:
        return 0
    from pamarl.cli import main as cli_main

    for c in cmds:
        if cli_main(c[1:]) != 0:
            return 1
    entrants = [Entrant(a, "model", str(out / "runs" / a)) for a in PAPER_ALGOS] + [Entrant("random", "random")]
    tournament(PAPER_ENV, entrants, episodes, seeds, out, sample, render)
    print((out / "summary.md").read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pamarl battle", description=(__doc__ or "").splitlines()[0])
    p.add_argument("entrants", nargs="*", help="random, script, NAME=RUN_DIR or NAME=RUN_DIR1,RUN_DIR2,... (pooled)")
    p.add_argument("--env", default="magent2/battle_v4?map_size=40&max_cycles=400")
    p.add_argument("--episodes", type=int, default=20, help="episodes per pair and seed")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated env seeds")
    p.add_argument("--out", default="results/battle")
    p.add_argument("--sample", action="store_true", help="models sample from their policies instead of acting greedily")
    p.add_argument("--render", metavar="FILE.gif", help="also record the first pair's first episode")
    p.add_argument("--preset", choices=["smoke", "paper"])
    p.add_argument("--train", action="store_true", help="with --preset paper: run the training, then the cross-play")
    p.add_argument("--rounds", type=int, default=PAPER_ROUNDS,
                   help=f"with --preset paper: self-play rounds per algorithm (default {PAPER_ROUNDS}, the paper's)")
    p.add_argument("--probe", action="store_true",
                   help="with --preset paper: time one round of each algorithm on this machine for the estimate")
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError as e:
        raise UsageError(f"--seeds takes comma-separated integers, got {args.seeds!r}") from e
    if not seeds or args.episodes < 1:
        raise UsageError("--seeds needs at least one seed and --episodes must be >= 1")
    if args.preset == "smoke":
        tournament(SMOKE_ENV, [parse_entrant(e) for e in SMOKE_ENTRANTS], SMOKE_EPISODES, [1], out, args.sample,
                   args.render)
        print((out / "summary.md").read_text())
        return 0
    if args.preset == "paper":
        return paper_preset(out, args.rounds, args.episodes, seeds, args.probe, args.train, args.sample, args.render)
    if not args.entrants:
        raise UsageError("name the entrants (random, script, NAME=RUN_DIR) or use --preset smoke|paper")
    tournament(args.env, [parse_entrant(e) for e in args.entrants], args.episodes, seeds, out, args.sample,
               args.render)
    print((out / "summary.md").read_text())
    return 0
