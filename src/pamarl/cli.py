"""Command line: ``pamarl train | eval | list | bench | compare | plot``.

Bad input (unknown algorithm, env or config key; bad value) prints one line naming the problem and
the nearest valid names, and exits with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from pamarl.errors import CheckpointError, RunInterrupted, TrainingError, UsageError


def _train(args: argparse.Namespace) -> int:
    from pamarl.config import TrainConfig, parse_overrides, to_dict
    from pamarl.envs.registry import check_trusted
    from pamarl.runner import build_configs, load_run_config, train
    from pamarl.validation import resume_changes

    values: dict[str, Any] = {}
    for key in ("algo", "env", "steps", "seed"):
        v = getattr(args, key)
        if v is not None:
            values[key] = v
    if args.resume:
        for flag, bad in (("--config", args.config), ("--preset", args.preset), ("--overwrite", args.overwrite)):
            if bad:
                raise UsageError(f"{flag} starts a new run; with --resume give the keys to change as key=value")
        if args.run_dir is not None and Path(args.run_dir) != Path(args.resume):
            raise UsageError("--resume RUN_DIR already names the run directory; leave out --run-dir")
        run0, algo0 = load_run_config(args.resume)
        check_trusted(run0.env, f"{Path(args.resume) / 'config.yaml'}", restated=args.env, trust=args.trust_env_code)
        resume_changes(to_dict(run0), {k: v for k, v in values.items() if k in ("algo", "env")}, TrainConfig)
        # The saved config, with what the user changes on top (pamarl.validation says what may change).
        saved = {f"run.{k}": v for k, v in to_dict(run0).items()}
        saved.update({f"algo.{k}": v for k, v in to_dict(algo0).items()})
        for k, v in {**values, **parse_overrides(args.overrides)}.items():
            short = k.split(".", 1)[1] if k.startswith(("run.", "algo.")) else k
            for prefixed in (f"run.{short}", f"algo.{short}"):
                saved.pop(prefixed, None)
            saved[k] = v
        saved["run.run_dir"] = str(args.resume)
        run, algo_cfg = build_configs(saved)
        result = train(run, algo_cfg, resume=True, checkpoint=args.checkpoint)
    else:
        if args.checkpoint:
            raise UsageError("--checkpoint picks the checkpoint to resume from: use it with --resume RUN_DIR")
        if args.run_dir is not None:
            values["run_dir"] = args.run_dir
        values.update(parse_overrides(args.overrides))
        run, algo_cfg = build_configs(values, args.config, args.preset)
        result = train(run, algo_cfg, overwrite=args.overwrite)
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
    from pamarl.envs.guard import build_env
    from pamarl.envs.registry import check_trusted
    from pamarl.errors import CheckpointError
    from pamarl.runner import cost_limit, evaluate, load_run_config, make_algorithm

    if args.episodes < 1:
        raise UsageError(f"--episodes must be at least 1, got {args.episodes}")
    run, algo_cfg = load_run_config(args.run_dir)
    check_trusted(run.env, f"{Path(args.run_dir) / 'config.yaml'}", restated=args.env, trust=args.trust_env_code)
    if args.env is not None and args.env != run.env:
        raise UsageError(f"--env {args.env!r} is not the env of this run ({run.env!r}); --env only re-states it")
    torch.set_num_threads(max(1, run.torch_threads))
    ckpt = Path(args.checkpoint) if args.checkpoint else Path(args.run_dir) / "checkpoints" / "latest.pt"
    state = load_checkpoint(ckpt)
    for key, now in (("algo_name", run.algo), ("env", run.env)):
        if state.get(key) not in (None, now):
            raise CheckpointError(f"{ckpt} was written by a run of {state[key]!r}, not {now!r} like {args.run_dir}")
    env = build_env(run.env, num_envs=1 if args.render else min(args.episodes, 8), seed=args.seed)
    try:
        algo = make_algorithm(run, algo_cfg, env.spec)
        try:
            algo.load_state_dict(state["algo"])
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as e:
            raise CheckpointError(f"{ckpt} does not match the algorithm, network sizes or env of {args.run_dir} "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
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
    from pamarl.validation import rule_for

    if args.config:
        cls = get_algorithm(args.config)
        for title, dc in (("run", TrainConfig), (cls.name, cls.Config)):
            print(f"[{title}]")
            docs = field_docs(dc)
            for f in dataclasses.fields(dc):
                default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                rule = rule_for(dc, f.name)
                allowed = f"  [{rule.describe()}{'' if rule.resume is True else '; fixed on --resume'}]" if rule else ""
                print(f"  {f.name} = {default!r}{allowed}\n      {docs.get(f.name, '')}")
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
    t.add_argument("--overwrite", action="store_true",
                   help="start over in a run directory that holds a run: deletes its checkpoints and logs")
    t.add_argument("--trust-env-code", dest="trust_env_code", action="store_true",
                   help="with --resume: accept an env id from the run directory that imports Python code")
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
    e.add_argument("--env", help="re-state the run's env id (needed for ids that import Python code)")
    e.add_argument("--trust-env-code", dest="trust_env_code", action="store_true",
                   help="accept an env id from the run directory that imports Python code")
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


_DELEGATED = {"bench": "pamarl.bench", "compare": "pamarl.compare", "plot": "pamarl.plot", "battle": "pamarl.battle"}


def main(argv: list[str] | None = None) -> int:
    """Run one command; every error a user can cause is one message and exit 2 (``--debug``: a traceback too)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("PAMARL_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    try:
        if argv and argv[0] in _DELEGATED:  # these parse their own options
            return int(_delegate(_DELEGATED[argv[0]])(argv[1:]) or 0)
        args, rest = parser.parse_known_args(argv)
        # key=value pairs may come after options (`train --algo x lr=1 --steps 9 gamma=0.9`): argparse
        # takes only the first run of positionals, so the later ones arrive here.
        if rest and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in rest):
            args.overrides = [*args.overrides, *rest]
        elif rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return int(args.fn(args) or 0)
    except SystemExit as e:  # argparse's usage errors (exit 2) and --help (exit 0)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except UsageError as e:
        return _fail(debug, f"pamarl: error: {e}", 2)
    except CheckpointError as e:
        return _fail(debug, f"pamarl: checkpoint error: {e}", 2)
    except TrainingError as e:
        return _fail(debug, f"pamarl: training stopped: {e}", 1)
    except RunInterrupted as e:
        return _fail(debug, f"\npamarl: {e}", 128 + e.signum)
    except KeyboardInterrupt:
        return _fail(debug, "\npamarl: interrupted (nothing is being trained here, so there is no checkpoint to "
                     "write)", 130)
    except OSError as e:
        if isinstance(e, BrokenPipeError):
            # Output piped into `head` and closed early: not an error. Point stdout at devnull so the
            # interpreter's final flush does not raise again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        where = f" ({e.filename})" if e.filename else ""
        fix = "free some space" if e.errno == errno.ENOSPC else "check the path and its permissions"
        return _fail(debug, f"pamarl: error: {e.strerror or e}{where}; {fix}. Files written before are intact", 2)
    except MemoryError:
        return _fail(debug, "pamarl: error: out of memory; lower num_envs, buffer_size or the network sizes", 2)
    except ImportError as e:
        return _fail(debug, f"pamarl: error: {e}; install the optional extra it belongs to "
                     "(pip install 'pamarl[...]', see the README)", 2)


def _fail(debug: bool, message: str, code: int) -> int:
    print(message, file=sys.stderr)
    if debug:
        import traceback

        traceback.print_exc()
    return code


if __name__ == "__main__":
    sys.exit(main())
