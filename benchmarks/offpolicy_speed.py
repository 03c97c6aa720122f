"""Off-policy learner speed: CPU milliseconds per gradient step and env steps per CPU second of training.

    PYTHONPATH=src .venv/bin/python benchmarks/offpolicy_speed.py                 # MADDPG, HATD3, QMIX
    PYTHONPATH=src .venv/bin/python benchmarks/offpolicy_speed.py --algos qmix --grad-steps 500

Everything is measured in CPU seconds of this one process (``time.process_time``) with one torch
thread, so that a shared, busy machine gives the figure an idle core would; compare two versions of
the code by running this script on each, interleaved, in the same session (``PYTHONPATH=<their src>``).

Two figures per algorithm, each with the algorithm's default config (printed):

* **gradient step**: the replay is filled by ``--fill`` vector steps of the (untrained) policy, then
  ``--grad-steps`` calls of ``train_step(sample(batch_size))`` plus the target sync the update loop
  does after each of them, the first 10 not timed;
* **training**: ``--train-steps`` env steps of the loop the runner runs (act, env step, store; every
  ``rollout_len`` steps the gradient steps due), started right after ``learning_starts`` env steps of
  warm-up (not timed), so every timed iteration learns. No evaluation, logging or checkpoints.

``--env mpe-torch`` runs the same task on the batched torch simulator (``mpe-torch/``, step for step
equal to mpe2 in ``tests/test_mpe_torch.py``), whose env step costs next to nothing; the gradient steps
per env step are the same (the default ``env_steps_per_update``).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time

import torch

from pamarl.algos.base import Progress
from pamarl.algos.offpolicy import OffPolicyAlgorithm
from pamarl.algos.registry import get_algorithm
from pamarl.config import TrainConfig
from pamarl.envs.registry import make_env
from pamarl.runner import make_algorithm

try:
    from pamarl.runner import apply_reward_convention, reward_convention
except ImportError:  # older code (e.g. 8dee6e5, the baseline of issue 15): the learners applied the convention
    def reward_convention(run: TrainConfig, spec: object) -> str:
        return "individual"

    def apply_reward_convention(step: object, convention: str) -> object:
        return step

TASKS = {"maddpg": "mpe/simple_spread_v3", "hatd3": "mpe/simple_spread_v3?continuous=true",
         "qmix": "mpe/simple_spread_v3"}


def build(name: str, env_id: str, num_envs: int, rollout_len: int, seed: int
          ) -> tuple[OffPolicyAlgorithm, object, TrainConfig]:
    """The algorithm with its default config on ``num_envs`` copies of ``env_id``."""
    run = TrainConfig(algo=name, env=env_id, num_envs=num_envs, rollout_len=rollout_len, steps=10**9, seed=seed)
    cfg = get_algorithm(name).Config()
    env = make_env(env_id, num_envs=num_envs, seed=seed)
    algo = make_algorithm(run, cfg, env.spec)
    assert isinstance(algo, OffPolicyAlgorithm)
    return algo, env, run


def collect(algo: OffPolicyAlgorithm, env: object, run: TrainConfig, obs: object, steps: int) -> object:
    """``steps`` vector steps of acting and storing (what the runner's collector does per step)."""
    conv = reward_convention(run, env.spec)  # type: ignore[attr-defined]
    for _ in range(steps):
        out = algo.act(obs)  # type: ignore[arg-type]
        st = env.step(out.env_action)  # type: ignore[attr-defined]
        algo.observe(obs, out, apply_reward_convention(st, conv))  # type: ignore[arg-type]
        obs = st.next
    return obs


def gradient_step_ms(name: str, env_id: str, fill: int, grad_steps: int, seed: int) -> float:
    """CPU ms per gradient step (sample, train_step, target sync) on a replay of ``fill`` vector steps."""
    algo, env, run = build(name, env_id, 8, 25, seed)
    obs = env.reset(seed=seed)  # type: ignore[attr-defined]
    collect(algo, env, run, obs, fill)

    def one() -> None:
        algo.train_step(algo.sample(algo.batch_size()))
        algo.updates += 1
        if algo.sync_every_step:
            algo.sync_targets()

    for _ in range(10):
        one()
    c0 = time.process_time()
    for _ in range(grad_steps):
        one()
    return (time.process_time() - c0) / grad_steps * 1e3


def training_rate(name: str, env_id: str, num_envs: int, rollout_len: int, train_steps: int, seed: int
                  ) -> tuple[float, int]:
    """Env steps per CPU second of the act/step/store/update loop after warm-up, and the gradient steps done."""
    algo, env, run = build(name, env_id, num_envs, rollout_len, seed)
    obs = env.reset(seed=seed)  # type: ignore[attr-defined]
    warm = -(-algo.cfg.learning_starts // num_envs)
    obs = collect(algo, env, run, obs, warm)
    algo.update(Progress(iteration=0, total_iterations=1, env_steps=0))  # pays the updates due so far
    iters = max(1, train_steps // (num_envs * rollout_len))
    u0 = algo.updates
    c0 = time.process_time()
    for it in range(iters):
        obs = collect(algo, env, run, obs, rollout_len)
        algo.update(Progress(iteration=it, total_iterations=iters, env_steps=0))
    dt = time.process_time() - c0
    return iters * num_envs * rollout_len / dt, algo.updates - u0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algos", default="maddpg,hatd3,qmix")
    ap.add_argument("--grad-steps", type=int, default=300)
    ap.add_argument("--fill", type=int, default=400, help="vector steps (of 8 envs) stored before timing")
    ap.add_argument("--train-steps", type=int, default=20_000, help="timed env steps of training (0: skip)")
    ap.add_argument("--num-envs", type=int, default=8)
    ap.add_argument("--rollout-len", type=int, default=25)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--env", choices=("mpe", "mpe-torch"), default="mpe",
                    help="env family of the task: mpe2 (numpy, per copy) or the batched torch simulator")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 torch thread, CPU time")
    for name in args.algos.split(","):
        env_id = TASKS.get(name, "mpe/simple_spread_v3").replace("mpe/", f"{args.env}/", 1)
        cfg = get_algorithm(name).Config()
        keys = ("batch_size", "env_steps_per_update", "hidden", "critic_hidden", "learning_starts", "tau",
                "policy_delay", "mixing_embed", "hypernet_layers")
        shown = {k: getattr(cfg, k) for k in keys if k in {f.name for f in dataclasses.fields(cfg)}}
        print(f"{name} on {env_id}: {shown}")
        ms = gradient_step_ms(name, env_id, args.fill, args.grad_steps, args.seed)
        print(f"  gradient step: {ms:.2f} CPU ms (batch {cfg.batch_size}, {args.grad_steps} steps)")
        if args.train_steps > 0:
            rate, n = training_rate(name, env_id, args.num_envs, args.rollout_len, args.train_steps, args.seed)
            print(f"  training: {rate:,.0f} env steps per CPU second ({args.num_envs} envs x rollout_len "
                  f"{args.rollout_len}, {n} gradient steps)")


if __name__ == "__main__":
    main()
