"""Replay memories for the off-policy family: single transitions, and whole episodes for recurrent agents.

Both keep preallocated torch tensors (no Python object per transition) laid out like the env
interface: one row holds every agent of one env copy (``[N, ...]``), so that centralised critics and
mixers see the joint transition. Rows are written ``E`` at a time as a ring.

Episode boundaries. ``BatchStep.final`` is the true last observation of an episode that just ended
(equal to ``next`` otherwise), so the stored successor of a transition is always read from ``final``.
A target bootstraps from it unless the episode *terminated*: a time-limit truncation (and a cut made
by the runner when it resets the envs at a checkpoint) keeps the bootstrap term
``gamma * Q(s', .)``, a termination drops it.

Multi-step returns (:meth:`ReplayBuffer.sample` with ``n_step > 1``) are computed when sampling: the
rows of one env copy are ``E`` apart in the ring, so the return follows a row's own stream forward
``R = sum_{k<m} gamma^k r_{t+k}`` until ``n`` steps, an episode end (terminated, truncated or cut), or the
newest row, and bootstraps from the successor of the last row used with ``gamma^m``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pamarl.envs.base import BatchObs, BatchStep, EnvSpec


@dataclass
class TransitionBatch:
    """Sampled single-step transitions, ``B`` rows of ``N`` agents."""

    obs: torch.Tensor  # [B, N, obs_dim]
    state: torch.Tensor  # [B, state_dim]
    action_mask: torch.Tensor  # [B, N, act_dim] bool
    active: torch.Tensor  # [B, N] bool
    action: torch.Tensor  # [B, N] long (discrete) or [B, N, act_dim] float (continuous, in [-1, 1])
    reward: torch.Tensor  # [B, N]
    terminated: torch.Tensor  # [B] float: 1 where the successor is terminal (no bootstrap)
    next_obs: torch.Tensor  # [B, N, obs_dim]: the true successor (``final``)
    next_state: torch.Tensor  # [B, state_dim]
    next_action_mask: torch.Tensor  # [B, N, act_dim] bool
    next_active: torch.Tensor  # [B, N] bool
    discount: torch.Tensor  # [B]: gamma^m, m the number of rewards summed in ``reward`` (1 unless n-step)


@dataclass
class EpisodeBatch:
    """Sampled episodes (or chunks of episodes), padded to a common length ``T``.

    Observation-like fields hold ``T + 1`` steps: index ``t + 1`` is the successor of step ``t``
    (for the last step of an episode, its ``final`` observation). ``filled`` marks real steps.
    """

    obs: torch.Tensor  # [B, T + 1, N, obs_dim]
    state: torch.Tensor  # [B, T + 1, state_dim]
    action_mask: torch.Tensor  # [B, T + 1, N, act_dim] bool
    active: torch.Tensor  # [B, T + 1, N] bool
    action: torch.Tensor  # [B, T, N] long or [B, T, N, act_dim]
    reward: torch.Tensor  # [B, T, N]
    terminated: torch.Tensor  # [B, T] float
    filled: torch.Tensor  # [B, T] float: 1 on real steps, 0 on padding


def _action_shape(spec: EnvSpec) -> tuple[tuple[int, ...], torch.dtype]:
    if spec.discrete:
        return (spec.n_agents,), torch.long
    return (spec.n_agents, spec.act_dim), torch.float32


def _obs_fields(spec: EnvSpec) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    n = spec.n_agents
    return {
        "obs": ((n, spec.obs_dim), torch.float32),
        "state": ((spec.state_dim,), torch.float32),
        "action_mask": ((n, spec.act_dim), torch.bool),
        "active": ((n,), torch.bool),
    }


class ReplayBuffer:
    """Ring buffer of single-step joint transitions (Mnih et al. 2015's experience replay).

    ``capacity`` counts rows, one row being one env copy's step (all agents), which is also how the
    runner counts env steps.
    """

    def __init__(self, spec: EnvSpec, capacity: int, device: torch.device | str = "cpu"):
        if capacity < 1:
            raise ValueError(f"replay capacity must be >= 1, got {capacity}")
        self.spec = spec
        self.capacity = int(capacity)
        self.device = torch.device(device)
        fields: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for k, v in _obs_fields(spec).items():
            fields[k] = v
            fields["next_" + k] = v
        fields["action"] = _action_shape(spec)
        fields["reward"] = ((spec.n_agents,), torch.float32)
        fields["terminated"] = ((), torch.float32)
        fields["done"] = ((), torch.bool)  # the episode ended after this row (n-step returns stop there)
        # One row-major table per dtype, every field a view of its columns: sampling gathers a row of
        # each table once (three index ops instead of thirteen, ~5% of a QMIX gradient step) and reads
        # the fields as views of the gathered rows.
        widths: dict[torch.dtype, int] = {}
        offsets: dict[str, tuple[torch.dtype, int, int]] = {}
        for k, (shape, dt) in fields.items():
            w = int(torch.Size(shape).numel())
            offsets[k] = (dt, widths.get(dt, 0), w)
            widths[dt] = widths.get(dt, 0) + w
        self.tables = {dt: torch.zeros((self.capacity, w), dtype=dt, device=self.device) for dt, w in widths.items()}
        self.shapes = {k: shape for k, (shape, _) in fields.items()}
        self.offsets = offsets
        self.data = {k: self._field(self.tables[dt], k) for k, (dt, _, _) in offsets.items()}
        self.ptr = 0
        self.size = 0
        self.stride = 0  # env copies per add: a row's next step in the same env copy is ``stride`` rows on

    def __len__(self) -> int:
        return self.size

    def _field(self, rows: torch.Tensor, k: str) -> torch.Tensor:
        """Field ``k`` as a view of ``rows`` ``[R, width]`` of its dtype's table: ``[R, *shape]``."""
        _, off, w = self.offsets[k]
        return rows[:, off:off + w].view(rows.shape[0], *self.shapes[k])

    def add(self, obs: BatchObs, action: torch.Tensor, step: BatchStep) -> None:
        """Store the ``E`` transitions of one vector step (successors read from ``step.final``)."""
        e = obs.obs.shape[0]
        if e > self.capacity:
            raise ValueError(f"replay capacity {self.capacity} is smaller than one step of {e} env copies")
        if self.stride not in (0, e):
            raise ValueError(f"replay rows come {self.stride} env copies at a time, got {e}")
        self.stride = e
        idx = (self.ptr + torch.arange(e, device=self.device)) % self.capacity
        d, dev = self.data, self.device
        for k in ("obs", "state", "action_mask", "active"):
            d[k][idx] = getattr(obs, k).to(dev)
            d["next_" + k][idx] = getattr(step.final, k).to(dev)
        d["action"][idx] = action.to(dev, d["action"].dtype)
        d["reward"][idx] = step.reward.to(dev, torch.float32)
        d["terminated"][idx] = step.terminated.to(dev, torch.float32)
        d["done"][idx] = (step.terminated | step.truncated).to(dev)
        self.ptr = (self.ptr + e) % self.capacity
        self.size = min(self.size + e, self.capacity)

    def cut(self) -> None:
        """Mark the newest rows as episode ends (the runner reset the envs); they still bootstrap."""
        if self.size and self.stride:
            idx = (self.ptr - 1 - torch.arange(self.stride, device=self.device)) % self.capacity
            self.data["done"][idx] = True

    def sample(self, batch_size: int, generator: torch.Generator, n_step: int = 1, gamma: float = 0.99
               ) -> TransitionBatch:
        """``batch_size`` rows drawn uniformly with replacement (indices from ``generator``, on its device).

        With ``n_step > 1`` the rewards are n-step discounted sums and the successor fields (``next_*``,
        ``terminated``) those of the last row summed; ``discount`` is ``gamma^m`` for the ``m`` rewards summed.
        """
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        idx = torch.randint(0, self.size, (batch_size,), generator=generator, device=generator.device).to(self.device)
        d = self.data
        discount = torch.full((batch_size,), float(gamma), device=self.device)
        last = idx
        reward = d["reward"][idx]
        if n_step > 1 and self.stride:
            age = (self.ptr - 1 - idx) % self.capacity  # 0 for the newest row
            alive = ~d["done"][idx]
            for k in range(1, n_step):
                ok = alive & (age >= k * self.stride)  # the env copy's k-th next step exists and follows on
                if not bool(ok.any()):
                    break
                nxt = (idx + k * self.stride) % self.capacity
                okf = ok.to(reward.dtype)
                reward = reward + (gamma**k) * okf.unsqueeze(-1) * d["reward"][nxt]
                last = torch.where(ok, nxt, last)
                discount = torch.where(ok, torch.full_like(discount, gamma ** (k + 1)), discount)
                alive = ok & ~d["done"][nxt]
        if last is idx:  # single steps: one gather per table, the fields views of the rows
            rows = {dt: t[idx] for dt, t in self.tables.items()}
            fields = {k: self._field(rows[dt], k) for k, (dt, _, _) in self.offsets.items() if k != "done"}
        else:
            fields = {k: v[idx] for k, v in d.items() if not k.startswith("next_") and k not in ("terminated", "done")}
            fields.update({k: v[last] for k, v in d.items() if k.startswith("next_") or k == "terminated"})
        fields["reward"] = reward
        return TransitionBatch(**fields, discount=discount)

    def state_dict(self) -> dict[str, Any]:
        """The filled part only (tensors and ints, loadable with ``weights_only=True``)."""
        return {"ptr": self.ptr, "size": self.size, "capacity": self.capacity, "stride": self.stride,
                "data": {k: v[: self.size].cpu().clone() for k, v in self.data.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"replay capacity {state['capacity']} in the checkpoint, {self.capacity} configured")
        self.ptr, self.size, self.stride = int(state["ptr"]), int(state["size"]), int(state["stride"])
        for k, v in self.data.items():
            v.zero_()
            v[: self.size] = state["data"][k].to(self.device)


class EpisodeReplay:
    """Ring buffer of whole episodes for recurrent agents (as in PyMARL's episode batches).

    Each env copy writes its running episode into a staging row; the row is committed to the ring
    when the episode ends, when it reaches ``max_len`` steps (a longer episode continues in a new
    chunk, whose first step starts from a zero hidden state), or when :meth:`flush` cuts every
    running episode (the runner resets the envs). A cut chunk still bootstraps from its last
    successor, like a truncation. ``capacity`` counts episodes (chunks).
    """

    def __init__(self, spec: EnvSpec, capacity: int, max_len: int, num_envs: int,
                 device: torch.device | str = "cpu"):
        if capacity < 1 or max_len < 1:
            raise ValueError(f"episode replay needs capacity >= 1 and max_len >= 1, got {capacity}, {max_len}")
        self.spec = spec
        self.capacity = int(capacity)
        self.max_len = int(max_len)
        self.num_envs = int(num_envs)
        self.device = torch.device(device)
        L = self.max_len
        self.fields: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            k: ((L + 1, *shape), dt) for k, (shape, dt) in _obs_fields(spec).items()
        }
        a_shape, a_dt = _action_shape(spec)
        self.fields.update({
            "action": ((L, *a_shape), a_dt),
            "reward": ((L, spec.n_agents), torch.float32),
            "terminated": ((L,), torch.float32),
            "filled": ((L,), torch.float32),
        })
        self.data = self._alloc(self.capacity)
        self.stage = self._alloc(self.num_envs)
        self.t = torch.zeros(self.num_envs, dtype=torch.long, device=self.device)
        self.ptr = 0
        self.size = 0

    def _alloc(self, rows: int) -> dict[str, torch.Tensor]:
        return {k: torch.zeros((rows, *shape), dtype=dt, device=self.device) for k, (shape, dt) in self.fields.items()}

    def __len__(self) -> int:
        return self.size

    def add(self, obs: BatchObs, action: torch.Tensor, step: BatchStep) -> None:
        """Append one step of every env copy to its running episode; commit the ones that ended."""
        dev = self.device
        e = torch.arange(self.num_envs, device=dev)
        t = self.t
        s = self.stage
        for k in ("obs", "state", "action_mask", "active"):
            s[k][e, t] = getattr(obs, k).to(dev)
            # The successor goes to t + 1; if the episode goes on, the next add overwrites it with the
            # same observation, so a cut at any point finds its bootstrap observation in place.
            s[k][e, t + 1] = getattr(step.final, k).to(dev)
        s["action"][e, t] = action.to(dev, s["action"].dtype)
        s["reward"][e, t] = step.reward.to(dev, torch.float32)
        s["terminated"][e, t] = step.terminated.to(dev, torch.float32)
        s["filled"][e, t] = 1.0
        self.t += 1
        ended = step.terminated.to(dev) | step.truncated.to(dev) | (self.t >= self.max_len)
        if bool(ended.any()):
            self._commit(torch.nonzero(ended).flatten())

    def flush(self) -> None:
        """Commit every running episode as it stands (the envs are about to be reset)."""
        self._commit(torch.nonzero(self.t > 0).flatten())

    def _commit(self, envs: torch.Tensor) -> None:
        k = int(envs.numel())
        if k == 0:
            return
        slots = (self.ptr + torch.arange(k, device=self.device)) % self.capacity
        for key, v in self.data.items():
            v[slots] = self.stage[key][envs]
            self.stage[key][envs] = 0
        self.t[envs] = 0
        self.ptr = (self.ptr + k) % self.capacity
        self.size = min(self.size + k, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator) -> EpisodeBatch:
        """``batch_size`` episodes uniformly with replacement, trimmed to the longest one drawn."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty episode replay")
        idx = torch.randint(0, self.size, (batch_size,), generator=generator, device=generator.device).to(self.device)
        filled = self.data["filled"][idx]
        T = int(filled.sum(1).max().item())
        out = {}
        for key, v in self.data.items():
            steps = T + 1 if self.fields[key][0][0] == self.max_len + 1 else T
            out[key] = v[idx, :steps]
        return EpisodeBatch(**out)

    def state_dict(self) -> dict[str, Any]:
        return {"ptr": self.ptr, "size": self.size, "capacity": self.capacity, "max_len": self.max_len,
                "t": self.t.cpu().clone(),
                "data": {k: v[: self.size].cpu().clone() for k, v in self.data.items()},
                "stage": {k: v.cpu().clone() for k, v in self.stage.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["capacity"]) != self.capacity or int(state["max_len"]) != self.max_len:
            raise ValueError("episode replay capacity/max_len in the checkpoint differ from the configured ones")
        self.ptr, self.size = int(state["ptr"]), int(state["size"])
        for k, v in self.data.items():
            v.zero_()
            v[: self.size] = state["data"][k].to(self.device)
        for k, v in self.stage.items():
            v.copy_(state["stage"][k].to(self.device))
        self.t.copy_(state["t"].to(self.device))
