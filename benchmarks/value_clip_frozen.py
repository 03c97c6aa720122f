"""Share of samples the value clip freezes (no critic gradient) at the first critic step of each iteration.

Usage: ``python benchmarks/value_clip_frozen.py ALGO ITERATIONS LABEL`` (on mpe/simple_spread_v3, 8 envs x
200 steps, seed 1). Run it with PYTHONPATH pointing at an older checkout to compare (issue 11, item 1).
A sample is frozen when its prediction left the clip range around the stored one and the clipped branch
of ``max(err(new), err(clipped))`` is the larger: its gradient is then zero.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import torch

from pamarl.config import TrainConfig
from pamarl.runner import train

has_critics = importlib.util.find_spec("pamarl.algos.critics") is not None
mod = importlib.import_module("pamarl.algos.critics" if has_critics else "pamarl.algos.onpolicy")
real = mod.value_loss
shares: list[float] = []


def spy(new, old, target, mask, clip, huber_delta):  # type: ignore[no-untyped-def]
    with torch.no_grad():
        def err(e: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.huber_loss(e, torch.zeros_like(e), reduction="none", delta=huber_delta)

        clipped = old + (new - old).clamp(-clip, clip)
        frozen = ((new - old).abs() > clip) & (err(target - clipped) > err(target - new)) & (mask > 0)
        shares.append(float(frozen.float().sum() / (mask > 0).float().sum()))
    return real(new, old, target, mask, clip, huber_delta)


def main() -> None:
    algo, iters, label = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    mod.value_loss = spy
    run = TrainConfig(algo=algo, env="mpe/simple_spread_v3", steps=iters * 1600, num_envs=8, rollout_len=200,
                      progress=False, tensorboard=False, eval_every=0, eval_episodes=2, seed=1,
                      run_dir=f"/tmp/frozen-{algo}-{label}")
    train(run)
    per = len(shares) // iters
    print(f"{label} {algo}: frozen share at the first critic step of iterations 1..{iters}:",
          " ".join(f"{x:.0%}" for x in shares[::per]))


if __name__ == "__main__":
    main()
