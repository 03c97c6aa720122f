"""The one training loop: collect -> algo.update -> log -> evaluate -> checkpoint.

Every algorithm, on- or off-policy, runs through :func:`train`. An iteration is ``rollout_len``
steps of ``num_envs`` env copies followed by one ``algo.update``; the steps come from the run's
:class:`pamarl.collect.Collector` (the learner acting on the env copies, or ``rollout_workers``).
The team return logged as ``train/return_mean`` is the mean, over the episodes that finished during
the iteration, of the undiscounted sum over agents of their episode returns. ``train/coordination`` is the coordination
rho of :func:`pamarl.metrics.coordination` over the iteration's rollout (sampled actions), for
algorithms whose acting reports log-probabilities; ``eval/coordination`` is the same over the
evaluation steps (greedy actions: undefined for continuous actions, whose greedy log-probability is
constant).

Exact resume: at every checkpoint the training envs are re-seeded (from the run seed and the
iteration) and reset, so the state to restore is only what the checkpoint holds (parameters,
optimisers, normalisers, RNG streams, counters), whatever the simulator. Unfinished episodes at that
point are cut and bootstrapped like a time limit (GAE already bootstraps the last step of a rollout).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import yaml

from pamarl.algos.base import Algorithm, Progress
from pamarl.algos.registry import get_algorithm
from pamarl.allocator import keep_freed_memory
from pamarl.checkpoint import load_checkpoint, save_checkpoint
from pamarl.collect import Collector, make_collector
from pamarl.config import TrainConfig, build, load_preset, load_yaml, split_keys, to_dict
from pamarl.envs.base import BatchedEnv, BatchStep, EnvSpec
from pamarl.envs.guard import build_env
from pamarl.envs.registry import resolve
from pamarl.errors import RunInterrupted, TrainingError, UsageError
from pamarl.logging import MetricsLogger
from pamarl.rundir import LOCK_NAME, RunLock, check_resume, make_dir, prepare_new, record_changes, restore
from pamarl.signals import CheckpointClock, StopRequest, latest_checkpoint_note
from pamarl.validation import check_together

DEFAULT_COST_LIMIT = 25.0


@dataclass
class TrainResult:
    """What a finished run reports."""

    run_dir: Path
    iterations: int
    env_steps: int
    wall_s: float
    first_return: float | None
    last_return: float | None
    final_eval: dict[str, float] = field(default_factory=dict)
    n_agents: int = 0

    @property
    def steps_per_s(self) -> float:
        return self.env_steps / max(self.wall_s, 1e-9)


# ---------------------------------------------------------------------- configuration
def build_configs(values: dict[str, Any], config_file: str | None = None, preset: str | None = None
                  ) -> tuple[TrainConfig, Any]:
    """Run and algorithm configs from a preset, a YAML file and flat overrides (later ones win)."""
    from_file: dict[str, Any] = load_yaml(config_file) if config_file else {}
    algo_name = values.get("run.algo", values.get("algo", from_file.get("run.algo", from_file.get("algo"))))
    algo_name = algo_name if algo_name is not None else TrainConfig.algo
    merged: dict[str, Any] = load_preset(preset, str(algo_name)) if preset else {}
    # A key given plainly overrides the same key given with a prefix by the preset (and vice versa).
    for k, v in {**from_file, **values}.items():
        bare = k.split(".", 1)[1] if k.startswith(("run.", "algo.")) else k
        for p in (bare, f"run.{bare}", f"algo.{bare}"):
            merged.pop(p, None)
        merged[k] = v
    algo_name = merged.get("run.algo", merged.get("algo", TrainConfig.algo))
    algo_cls = get_algorithm(str(algo_name))
    run_v, algo_v = split_keys(merged, algo_cls.Config)
    run = build(TrainConfig, run_v, "run")
    algo_cfg = build(algo_cls.Config, algo_v, f"{algo_cls.name}")
    check_together(run, algo_cfg)
    resolve(run.env)  # an unknown env or a bad ?parameter fails here, before any directory is made
    return run, algo_cfg


def cost_limit(run: TrainConfig) -> float:
    """The run's cost limit, or the env family's default for the task (e.g. scaled to its episode
    length on safe MaMuJoCo), or 25 per episode."""
    if run.cost_limit is not None:
        return float(run.cost_limit)
    fam, _, params = resolve(run.env)
    default = fam.cost_limit(params)
    return float(default if default is not None else DEFAULT_COST_LIMIT)


def env_seed(seed: int, iteration: int) -> int:
    """Seed for the training envs' reset at ``iteration`` (0 at the start, then each checkpoint)."""
    return (seed * 1_000_003 + iteration * 9_973) % (2**31 - 1)


def default_run_dir(run: TrainConfig) -> Path:
    task = run.env.split("?")[0].replace("/", "_").replace("|", "_")
    return Path("runs") / f"{run.algo}-{task}-s{run.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


# ---------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(algo: Algorithm, env: BatchedEnv, episodes: int, seed: int, deterministic: bool = True,
             limit: float | None = None, max_steps: int = 100_000,
             record: dict[str, list[float]] | None = None) -> dict[str, float]:
    """Play ``episodes`` whole episodes; report team return, length, cost, coordination.

    Coordination rho is the mean Pearson correlation over agent pairs of the per-step log-probability
    of the action taken (``specs/progressive.md``), over all evaluation steps. With ``record``, each
    episode's team return (and cost, on tasks with one) is appended to ``record["returns"]``
    (``record["costs"]``), for metrics that need the episodes rather than their mean.
    """
    obs = env.reset(seed=seed)
    finished: list[Any] = []
    logps: list[torch.Tensor] = []
    steps = 0
    with algo.evaluation():
        while len(finished) < episodes and steps < max_steps:
            out = algo.act(obs, explore=not deterministic)
            if out.logp is not None:
                logps.append(out.logp.reshape(-1, env.spec.n_agents).cpu())
            st = env.step(out.env_action)
            finished.extend(st.episodes)
            obs = st.next
            steps += 1
    finished = finished[:episodes]
    if not finished:
        return {}
    rets = np.array([e.team_return for e in finished])
    if record is not None:
        record.setdefault("returns", []).extend(float(r) for r in rets)
        if env.spec.has_cost:
            record.setdefault("costs", []).extend(float(e.cost) for e in finished)
    res = {
        "eval/return_mean": float(rets.mean()),
        "eval/return_std": float(rets.std()),
        "eval/length_mean": float(np.mean([e.length for e in finished])),
        "eval/episodes": float(len(finished)),
    }
    if env.spec.has_cost:
        costs = np.array([e.cost for e in finished])
        res["eval/cost_mean"] = float(costs.mean())
        if limit is not None:
            res["eval/constraint_sat"] = float((costs <= limit).mean())
    if logps and env.spec.n_agents > 1:
        from pamarl.metrics import coordination

        res["eval/coordination"] = float(coordination(torch.cat(logps).numpy()))
    return res


# ---------------------------------------------------------------------- training
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def reward_convention(run: TrainConfig, spec: EnvSpec) -> str:
    """The run's reward convention with ``auto`` resolved: team on cooperative tasks, else individual."""
    if run.reward != "auto":
        return run.reward
    return "team" if spec.cooperative else "individual"


def apply_reward_convention(step: BatchStep, convention: str) -> BatchStep:
    """What the learners see: under ``team`` every agent's reward becomes the sum over the agents.

    Applied once, here, for every algorithm; episode statistics (``step.episodes``) are untouched, so
    reported team returns are the same under either convention.
    """
    if convention != "team":
        return step
    r = step.reward
    return dataclasses.replace(step, reward=r.sum(-1, keepdim=True).expand_as(r).contiguous())


def _write_config(run_dir: Path, run: TrainConfig, algo_cfg: Any, spec: EnvSpec, algo: Algorithm) -> None:
    doc = {
        "run": to_dict(run),
        "algo": to_dict(algo_cfg),
        "reward_convention": reward_convention(run, spec),
        "resolved": algo.resolved(),
        "env_spec": {
            "agents": list(spec.agent_ids),
            "obs_dims": list(spec.obs_dims),
            "state_dim": spec.state_dim,
            "action_kind": spec.action_kind,
            "action_dims": list(spec.action_dims),
            "has_cost": spec.has_cost,
        },
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def load_run_config(run_dir: str | Path) -> tuple[TrainConfig, Any]:
    """Rebuild the configs saved in ``run_dir/config.yaml``."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UsageError(f"{str(run_dir)!r} is not a pamarl run directory (no config.yaml)")
    try:
        doc = yaml.safe_load(path.read_text())
        run_doc, algo_doc = doc["run"], doc["algo"]
        if not isinstance(run_doc, dict) or not isinstance(algo_doc, dict):
            raise TypeError("run: and algo: must be mappings")
    except (yaml.YAMLError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise UsageError(f"{str(path)!r} is corrupt or not a pamarl run config ({type(e).__name__}: {e}); "
                         "restore it from a copy, or start a new run elsewhere") from e
    except OSError as e:
        raise UsageError(f"{str(path)!r} cannot be read ({e.strerror})") from e
    try:
        run = build(TrainConfig, run_doc, "run")
        algo_cls = get_algorithm(run.algo)
        return run, build(algo_cls.Config, algo_doc, algo_cls.name)
    except UsageError as e:
        raise UsageError(f"{str(path)!r}: {e}") from e


def make_algorithm(run: TrainConfig, algo_cfg: Any, spec: EnvSpec) -> Algorithm:
    algo_cls = get_algorithm(run.algo)
    return algo_cls(spec, algo_cfg, run, torch.device(run.device))


def _np_legacy_state() -> tuple[str, np.ndarray, int, int, float]:
    # The global RandomState is an MT19937, whose legacy state is this tuple; numpy's stub types the
    # no-argument call as a dict.
    return cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": _np_legacy_state()[1].tolist(), "python": random.getstate()}


def train(run: TrainConfig, algo_cfg: Any = None, resume: bool = False, checkpoint: str | None = None,
          quiet: bool = False, overwrite: bool = False) -> TrainResult:
    """Train ``run.algo`` on ``run.env``; resume from ``run_dir/checkpoints/latest.pt`` with ``resume``.

    The run directory is locked while training (:class:`pamarl.rundir.RunLock`); a new run refuses a
    directory that already holds something unless ``overwrite``. A resume may change the keys
    :mod:`pamarl.validation` allows; the changes go to ``config_history.yaml``.
    """
    if algo_cfg is None:
        saved = Path(run.run_dir or "") / "config.yaml"
        # A resumed run keeps the algorithm config it was started with, not the defaults.
        algo_cfg = load_run_config(saved.parent)[1] if resume and saved.is_file() else get_algorithm(run.algo).Config()
    run_dir = Path(run.run_dir) if run.run_dir else default_run_dir(run)
    fresh = make_dir(run_dir)
    lock = RunLock(run_dir).acquire()
    try:
        if resume and not (run_dir / "config.yaml").is_file():
            raise UsageError(f"{str(run_dir)!r} is not a pamarl run directory (no config.yaml): nothing to resume")
        if not resume:
            prepare_new(run_dir, overwrite)
        return _train_locked(dataclasses.replace(run, run_dir=str(run_dir)), algo_cfg, resume, checkpoint, quiet)
    except RunInterrupted:  # already says where the checkpoint is
        raise
    except TrainingError as e:  # NaN loss, env failure: say truly what a resume would start from
        raise type(e)(f"{e} ({latest_checkpoint_note(run_dir / 'checkpoints')})") from e
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started: say what is on disk
        raise RunInterrupted(f"stopped at once; {latest_checkpoint_note(run_dir / 'checkpoints')}") from None
    finally:
        # A new directory that stayed empty is removed, with the lock still held so no one else slips in.
        with contextlib.suppress(OSError):
            if fresh and [p.name for p in run_dir.iterdir()] == [LOCK_NAME]:
                (run_dir / LOCK_NAME).unlink(missing_ok=True)
                run_dir.rmdir()
        lock.release()


def _train_locked(run: TrainConfig, algo_cfg: Any, resume: bool, checkpoint: str | None,
                  quiet: bool) -> TrainResult:
    torch.set_num_threads(max(1, run.torch_threads))
    keep_freed_memory()  # no page faults on the learner's activations (pamarl.allocator)
    _seed_everything(run.seed)
    run_dir = Path(str(run.run_dir))
    ckpt_dir = run_dir / "checkpoints"

    state = None
    changes: dict[str, tuple[Any, Any]] = {}
    if resume:
        state = load_checkpoint(checkpoint or ckpt_dir / "latest.pt")
        changes = check_resume(run, algo_cfg, state)

    collector = make_collector(run, algo_cfg)
    try:
        eval_env = build_env(run.env, num_envs=min(run.eval_episodes, 8) or 1, workers=0, seed=run.seed + 99_991,
                             device=run.device)
    except BaseException:
        collector.close()
        raise
    algo: Algorithm | None = None
    try:
        spec = collector.spec
        algo = make_algorithm(run, algo_cfg, spec)
        for e in (collector.env, eval_env):  # two-team envs whose opponent is a lagged copy of the learner
            attach = getattr(e, "attach_learner", None)
            if attach is not None:
                attach(algo)
        limit = cost_limit(run) if spec.has_cost else None
        if limit is not None:
            algo.set_cost_limit(limit)
        per_iter = run.num_envs * run.rollout_len
        total_iters = max(1, math.ceil(run.steps / per_iter))
        it0, env_steps, wall0 = 0, 0, 0.0
        if state is not None:
            restore(algo, state, changes, quiet)
            it0, env_steps, wall0 = int(state["iteration"]), int(state["env_steps"]), float(state["wall_s"])
            torch.set_rng_state(state["rng"]["torch"])
            np_state = _np_legacy_state()
            np.random.set_state((np_state[0], np.array(state["rng"]["numpy"], dtype=np.uint32), *np_state[2:]))
            py = state["rng"]["python"]
            random.setstate((py[0], tuple(py[1]), py[2]))
        _write_config(run_dir, run, algo_cfg, spec, algo)
        if changes and state is not None:
            record_changes(run_dir, changes, it0, env_steps, str(checkpoint or ckpt_dir / "latest.pt"))
        logger = MetricsLogger(run_dir, run.tensorboard, resume_iteration=it0 if state is not None else None)
        return _loop(run, algo, collector, eval_env, logger, run_dir, ckpt_dir, it0, total_iters, env_steps, wall0,
                     limit, quiet)
    finally:
        collector.close()
        eval_env.close()
        if algo is not None:
            algo.close()


def _loop(run: TrainConfig, algo: Algorithm, collector: Collector, eval_env: BatchedEnv, logger: MetricsLogger,
          run_dir: Path, ckpt_dir: Path, it0: int, total_iters: int, env_steps: int, wall0: float,
          limit: float | None, quiet: bool) -> TrainResult:
    from tqdm import tqdm

    per_iter = run.num_envs * run.rollout_len
    bar = tqdm(total=total_iters * per_iter, initial=env_steps, unit="step", unit_scale=True,
               disable=quiet or not run.progress, dynamic_ncols=True, desc=f"{run.algo} {run.env}")
    first_ret = last_ret = None
    for r in logger.rows:
        v = r.get("train/return_mean")
        if v not in (None, ""):
            first_ret = float(v) if first_ret is None else first_ret
            last_ret = float(v)
    final_eval: dict[str, float] = {}
    t_start = time.perf_counter() - wall0
    collector.reset(seed=env_seed(run.seed, it0))
    stop, clock = StopRequest().__enter__(), CheckpointClock(run.checkpoint_minutes)
    try:
        convention = reward_convention(run, collector.spec)
        # With env_inline the env workers hold the other cores while the rollout is collected: acting on one
        # torch thread keeps OpenMP's spinning threads off them (2 threads there measured 25% slower); the
        # update, when the workers are idle, gets torch_threads.
        threads = max(1, run.torch_threads)
        collect_threads = 1 if run.env_inline else threads
        for it in range(it0, total_iters):
            if collect_threads != threads:
                torch.set_num_threads(collect_threads)
            got = collector.collect(algo, it, lambda st: apply_reward_convention(st, convention))
            episodes, logps = got.episodes, got.logps
            env_steps += per_iter
            if collect_threads != threads:
                torch.set_num_threads(threads)
            metrics = algo.update(Progress(iteration=it, total_iterations=total_iters, env_steps=env_steps))
            row: dict[str, Any] = {"iteration": it + 1, "env_steps": env_steps,
                                   "wall_s": round(time.perf_counter() - t_start, 3)}
            if episodes:
                rets = [e.team_return for e in episodes]
                row["train/return_mean"] = float(np.mean(rets))
                row["train/length_mean"] = float(np.mean([e.length for e in episodes]))
                row["train/episodes"] = len(episodes)
                if collector.spec.has_cost:
                    row["cost/episode_mean"] = float(np.mean([e.cost for e in episodes]))
                first_ret = row["train/return_mean"] if first_ret is None else first_ret
                last_ret = row["train/return_mean"]
            if logps:
                from pamarl.metrics import coordination

                row["train/coordination"] = coordination(torch.cat(logps).cpu().numpy())
            row.update(got.metrics)
            row.update(metrics)
            last = it + 1 == total_iters
            if last or (run.eval_every > 0 and (it + 1) % run.eval_every == 0):
                episodes_rec: dict[str, list[float]] = {}
                final_eval = evaluate(algo, eval_env, run.eval_episodes, seed=env_seed(run.seed + 1, it + 1),
                                      deterministic=run.eval_deterministic, limit=limit, record=episodes_rec)
                row.update(final_eval)
                logger.log_eval_episodes(it + 1, env_steps, episodes_rec)
            logger.log(row)
            periodic = run.checkpoint_every > 0 and (it + 1) % run.checkpoint_every == 0
            if last or periodic or clock.due() or stop.requested:
                payload = {
                    "iteration": it + 1,
                    "env_steps": env_steps,
                    "wall_s": time.perf_counter() - t_start,
                    "algo": algo.state_dict(),
                    "rng": _rng_state(),
                    # Only periodic checkpoints reset the envs (below), so only they resume bit-exactly;
                    # wall-time and signal ones do not, so that a run's result never depends on timing.
                    "exact": bool(last or periodic),
                    "algo_name": run.algo,
                    "env": run.env,
                }
                save_checkpoint(ckpt_dir / "latest.pt", payload)
                clock.reset()
                if run.keep_checkpoints and (last or periodic):
                    save_checkpoint(ckpt_dir / f"it{it + 1:06d}.pt", payload)
                if last:
                    save_checkpoint(ckpt_dir / "final.pt", payload)
                elif periodic:
                    collector.reset(seed=env_seed(run.seed, it + 1))
                    algo.reset_rollout()
            bar.update(per_iter)
            post = {}
            if last_ret is not None:
                post["ret"] = f"{last_ret:.2f}"
            if "eval/return_mean" in row:
                post["eval"] = f"{row['eval/return_mean']:.2f}"
            bar.set_postfix(post, refresh=False)
            if stop.requested and not last:
                raise RunInterrupted(f"{stop.name}: stopped after iteration {it + 1}; checkpoint written to "
                                     f"{ckpt_dir / 'latest.pt'} ({env_steps:,} env steps); resume with "
                                     f"`pamarl train --resume {run_dir}`", stop.signum or 2)
    finally:
        stop.__exit__(None, None, None)
        bar.close()
        logger.close()
    wall = time.perf_counter() - t_start
    result = TrainResult(run_dir=run_dir, iterations=total_iters, env_steps=env_steps, wall_s=wall,
                         first_return=first_ret, last_return=last_ret, final_eval=final_eval,
                         n_agents=collector.spec.n_agents)
    summary = {
        "algo": run.algo, "env": run.env, "seed": run.seed, "env_steps": env_steps, "iterations": total_iters,
        "wall_s": round(wall, 2), "env_steps_per_s": round(result.steps_per_s, 1),
        "train_return_first": first_ret, "train_return_last": last_ret, **final_eval,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return result
