"""Command line: ``pamarl train | eval | list | bench | compare | plot``.

Bad input (unknown algorithm, env or config key; bad value) prints one line naming the problem and
the nearest valid names, and exits with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from pathlib import Path
from typing import Any

from pamarl.errors import CheckpointError, TrainingError, UsageError


def _train(args: argparse.Namespace) -> int:
    from pamarl.config import parse_overrides
    from pamarl.runner import build_configs, load_run_config, train

    if args.resume:
        run, algo_cfg = load_run_config(args.resume)
        if args.overrides or args.algo or args.env or args.steps is not None:
            extra = parse_overrides(args.overrides)
            if args.steps is not None:
                extra["steps"] = args.steps
            bad = [k for k in extra if k not in ("steps", "run.steps", "progress", "tensorboard")]
            if args.algo or args.env or bad:
                raise UsageError("--resume continues a run as configured; only --steps may change")
            run = dataclasses.replace(run, steps=int(extra.get("steps", extra.get("run.steps", run.steps))))
        run = dataclasses.replace(run, run_dir=str(args.resume))
        result = train(run, algo_cfg, resume=True, checkpoint=args.checkpoint)
    else:
        values: dict[str, Any] = {}
        for key in ("algo", "env", "steps", "seed", "run_dir"):
            v = getattr(args, key)
            if v is not None:
                values[key] = v
        values.update(parse_overrides(args.overrides))
        run, algo_cfg = build_configs(values, args.config, args.preset)
        result = train(run, algo_cfg)
    first = "n/a" if result.first_return is None else f"{result.first_return:.3f}"
    last = "n/a" if result.last_return is None else f"{result.last_return:.3f}"
    print(f"\nTrained {run.algo} on {run.env} for {result.env_steps:,} env steps in {result.wall_s:.1f} s "
          f"({result.steps_per_s:,.0f} steps/s)")
    print(f"  train team return: first iteration {first} -> last iteration {last}")
    if result.final_eval:
        ev = result.final_eval
        line = (f"  eval return: {ev['eval/return_mean']:.3f} +- {ev['eval/return_std']:.3f} "
                f"over {int(ev['eval/episodes'])} episodes")
        if "eval/cost_mean" in ev:
            line += f"; cost {ev['eval/cost_mean']:.2f}"
        print(line)
    print(f"  run directory: {result.run_dir} (metrics.csv, tb/, checkpoints/, config.yaml, summary.json)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from pamarl.checkpoint import load_checkpoint
    from pamarl.envs.registry import make_env
    from pamarl.runner import cost_limit, evaluate, load_run_config, make_algorithm

    run, algo_cfg = load_run_config(args.run_dir)
    torch.set_num_threads(max(1, run.torch_threads))
    ckpt = Path(args.checkpoint) if args.checkpoint else Path(args.run_dir) / "checkpoints" / "latest.pt"
    state = load_checkpoint(ckpt)
    env = make_env(run.env, num_envs=1 if args.render else min(args.episodes, 8), seed=args.seed)
    try:
        algo = make_algorithm(run, algo_cfg, env.spec)
        algo.load_state_dict(state["algo"])
        limit = cost_limit(run) if env.spec.has_cost else None
        if args.render:
            from pamarl.render import record_episode

            info = record_episode(algo, run.env, args.render, seed=args.seed, deterministic=not args.stochastic)
            print(f"wrote {args.render}: {info['frames']} frames, team return {info['return']:.3f}")
        res = evaluate(algo, env, args.episodes, seed=args.seed, deterministic=not args.stochastic, limit=limit)
    finally:
        env.close()
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{run.algo} on {run.env}, checkpoint {ckpt} (iteration {state['iteration']}, "
              f"{state['env_steps']:,} env steps)")
        for k, v in res.items():
            print(f"  {k}: {v:.4f}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from pamarl.algos.registry import algorithms, get_algorithm
    from pamarl.config import TrainConfig, field_docs
    from pamarl.envs.registry import _BUILTIN_MODULES, families

    if args.config:
        cls = get_algorithm(args.config)
        for title, dc in (("run", TrainConfig), (cls.name, cls.Config)):
            print(f"[{title}]")
            docs = field_docs(dc)
            for f in dataclasses.fields(dc):
                default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                print(f"  {f.name} = {default!r}\n      {docs.get(f.name, '')}")
        return 0
    print("Algorithms:")
    for name, cls in algorithms().items():
        caps = ["/".join(cls.action_kinds)]
        caps += [c for c, on in (("cost", cls.uses_cost), ("rnn", cls.supports_recurrent),
                                 ("no shared params", not cls.supports_shared_params)) if on]
        print(f"  {name:<12} [{', '.join(caps)}]  {cls.paper}")
    print("\nEnvironments (family/task; parameters as ?key=value):")
    fams = families()
    for name, fam in sorted(fams.items()):
        print(f"  {name}: {fam.description}")
        for task, desc in fam.tasks.items():
            print(f"    {name}/{task:<28} {desc}")
    missing = sorted(set(_BUILTIN_MODULES) - set(fams))
    for name in missing:
        extra = {"mamujoco": "mujoco", "safe-mamujoco": "mujoco"}.get(name, name)
        print(f"  {name}: not available (pip install 'pamarl[{extra}]')")
    print("\nConfig keys of an algorithm: pamarl list --config <algo>")
    return 0


def _delegate(module: str) -> Any:
    return importlib.import_module(module).main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pamarl", description="Cooperative multi-agent RL: train, evaluate, compare.")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train an algorithm on an env",
                       description="Train; extra key=value pairs set any config key (pamarl list --config ALGO).")
    t.add_argument("--algo", help="algorithm name (default: progressive)")
    t.add_argument("--env", help="env id, e.g. mpe/simple_spread_v3 or 'matrix/homogeneity_trap?n=4'")
    t.add_argument("--steps", type=int, help="total env steps")
    t.add_argument("--seed", type=int)
    t.add_argument("--run-dir", dest="run_dir", help="output directory")
    t.add_argument("--config", help="YAML file of config keys (flat or with run:/algo: sections)")
    t.add_argument("--preset", help="a shipped preset reproducing a reference's defaults: harl-mpe, "
                   "harl-mamujoco, epymarl-qmix (docs/deviations.md); --config and key=value override it")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    t.add_argument("--checkpoint", help="with --resume: a specific checkpoint file")
    t.add_argument("overrides", nargs="*", metavar="key=value")
    t.set_defaults(fn=_train)

    e = sub.add_parser("eval", help="evaluate a trained run")
    e.add_argument("run_dir")
    e.add_argument("--episodes", type=int, default=10)
    e.add_argument("--seed", type=int, default=12345)
    e.add_argument("--checkpoint", help="checkpoint file (default: RUN_DIR/checkpoints/latest.pt)")
    e.add_argument("--stochastic", action="store_true", help="sample actions instead of the greedy policy")
    e.add_argument("--render", metavar="OUT", help="write an animation of one episode (.gif or .mp4)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=_eval)

    ls = sub.add_parser("list", help="list algorithms and environments")
    ls.add_argument("--config", metavar="ALGO", help="print the config keys of ALGO with defaults and help")
    ls.set_defaults(fn=_list)

    for name, module, help_ in (
        ("bench", "pamarl.bench", "measure training and raw env throughput and peak memory"),
        ("compare", "pamarl.compare", "run algorithms x envs x seeds and write a comparison report"),
        ("plot", "pamarl.plot", "plot learning curves of runs"),
    ):
        sp = sub.add_parser(name, help=help_, add_help=False)
        sp.add_argument("rest", nargs=argparse.REMAINDER)
        sp.set_defaults(fn=lambda a, m=module: _delegate(m)(a.rest))
    return p


_DELEGATED = {"bench": "pamarl.bench", "compare": "pamarl.compare", "plot": "pamarl.plot"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        if argv and argv[0] in _DELEGATED:  # these parse their own options
            return int(_delegate(_DELEGATED[argv[0]])(argv[1:]) or 0)
        args = parser.parse_args(argv)
        return int(args.fn(args) or 0)
    except UsageError as e:
        print(f"pamarl: error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"pamarl: checkpoint error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"pamarl: training stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\npamarl: interrupted; the latest checkpoint is intact (resume with --resume RUN_DIR)", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into `head` and closed early: not an error. Point stdout at devnull so the
        # interpreter's final flush does not raise again.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
