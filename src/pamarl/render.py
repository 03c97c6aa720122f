"""Record an episode of a trained policy as an animation (GIF, or MP4 with imageio-ffmpeg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike

from pamarl.errors import UsageError


def record_episode(algo: Any, env_id: str, out: str, seed: int = 0, deterministic: bool = True,
                   fps: int = 15, max_steps: int = 10_000) -> dict[str, float]:
    """Play one episode with ``algo`` in a render-capable copy of ``env_id`` and write ``out``."""
    import imageio.v2 as imageio

    from pamarl.envs.registry import make_env, resolve

    fam, _, _ = resolve(env_id)
    kw: dict[str, Any] = {"render_mode": "rgb_array"} if fam.name in ("mpe", "mamujoco", "safe-mamujoco") else {}
    env = make_env(env_id, num_envs=1, seed=seed, **kw)
    try:
        obs = env.reset(seed=seed)
        raw: list[np.ndarray | None] = []
        first = env.render(0)
        if first is None:
            raise UsageError(f"env {env_id!r} cannot render frames (no renderer for this family or no GL backend)")
        raw.append(first)
        ret = 0.0
        with torch.no_grad():
            for _ in range(max_steps):
                act = algo.act(obs, explore=not deterministic)
                st = env.step(act.env_action)
                if st.episodes:
                    ret = st.episodes[0].team_return
                    break
                raw.append(env.render(0))
                obs = st.next
    finally:
        env.close()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames: list[ArrayLike] = [np.asarray(f, np.uint8) for f in raw if f is not None]
    if path.suffix.lower() == ".gif":
        imageio.mimsave(path, frames, duration=1.0 / fps, loop=0)
    else:
        try:
            imageio.mimsave(path, frames, fps=fps)
        except (ImportError, ValueError) as e:
            raise UsageError(f"cannot write {out!r} ({e}); write a .gif, or pip install imageio-ffmpeg for .mp4") from e
    return {"frames": len(frames), "return": ret}
