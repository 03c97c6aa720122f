"""Replay of single-agent transitions for teams that share one network (mean-field MARL, many agents).

A row is one agent's transition ``(o, a, mean_a, r, o', mean_a', done)``: the successor fields are stored
in the row itself, so sampling never indexes across a trajectory boundary (the original MF-Q code read
``o'`` from the next row, mixing episodes). Only agents alive at ``t`` are stored; an agent killed at
``t`` stores its last transition with ``done = 1`` (kept, not masked out: death must be learned).
Storage is preallocated on first use (``capacity`` rows); observations are kept in float16 by default,
which is exact enough for MAgent's 0/1 presence and HP-fraction channels and halves the memory.
"""

from __future__ import annotations

import math
from typing import Any

import torch

FIELDS = ("obs", "next_obs", "action", "reward", "done", "mean", "next_mean", "next_mask")


class AgentReplay:
    """Ring buffer of agent transitions, preallocated tensors, uniform sampling with replacement."""

    def __init__(self, capacity: int, obs_dim: int, n_actions: int, mean_dim: int, device: torch.device | str = "cpu",
                 obs_dtype: torch.dtype = torch.float16):
        if capacity < 1:
            raise ValueError(f"replay capacity must be >= 1, got {capacity}")
        self.capacity, self.obs_dim, self.n_actions, self.mean_dim = int(capacity), obs_dim, n_actions, mean_dim
        self.device = torch.device(device)
        self.obs_dtype = obs_dtype
        self.data: dict[str, torch.Tensor] = {}
        self.ptr = 0
        self.size = 0

    def _shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"obs": ((self.obs_dim,), self.obs_dtype), "next_obs": ((self.obs_dim,), self.obs_dtype),
                "action": ((), torch.long), "reward": ((), torch.float32), "done": ((), torch.float32),
                "mean": ((self.mean_dim,), torch.float16), "next_mean": ((self.mean_dim,), torch.float16),
                "next_mask": ((self.n_actions,), torch.bool)}

    def allocate(self) -> None:
        if not self.data:
            self.data = {k: torch.zeros((self.capacity, *s), dtype=dt, device=self.device)
                         for k, (s, dt) in self._shapes().items()}

    def nbytes(self) -> int:
        """Bytes the buffer holds once allocated (reported as train/replay_mb)."""
        per_row = sum(torch.empty((), dtype=dt).element_size() * math.prod(s) for s, dt in self._shapes().values())
        return per_row * self.capacity

    def __len__(self) -> int:
        return self.size

    def clear(self) -> None:
        self.ptr = self.size = 0

    def add(self, rows: dict[str, torch.Tensor]) -> None:
        """Append ``k`` rows (each field ``[k, ...]``), overwriting the oldest when full."""
        self.allocate()
        k = int(rows["action"].shape[0])
        if k == 0:
            return
        if k > self.capacity:
            rows = {key: v[-self.capacity:] for key, v in rows.items()}
            k = self.capacity
        idx = (self.ptr + torch.arange(k, device=self.device)) % self.capacity
        for key, v in rows.items():
            self.data[key][idx] = v.to(self.device, self.data[key].dtype)
        self.ptr = (self.ptr + k) % self.capacity
        self.size = min(self.size + k, self.capacity)

    def rows(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The given rows, observations and mean actions back in float32."""
        out = {k: v[idx] for k, v in self.data.items()}
        for k in ("obs", "next_obs", "mean", "next_mean"):
            out[k] = out[k].float()
        return out

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay")
        return self.rows(torch.randint(0, self.size, (batch_size,), generator=generator).to(self.device))

    def newest(self, k: int) -> dict[str, torch.Tensor]:
        """The ``k`` most recent rows (the on-policy batch of MF-AC)."""
        k = min(k, self.size)
        return self.rows((self.ptr - k + torch.arange(k, device=self.device)) % self.capacity)

    def state_dict(self) -> dict[str, Any]:
        return {"ptr": self.ptr, "size": self.size, "capacity": self.capacity,
                "data": {k: v[: self.size].cpu().clone() for k, v in self.data.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"replay capacity {state['capacity']} in the checkpoint, {self.capacity} configured")
        self.allocate()
        self.ptr, self.size = int(state["ptr"]), int(state["size"])
        for k, v in self.data.items():
            v.zero_()
            v[: self.size] = state["data"][k].to(self.device)
