"""The one batched multi-agent environment interface every algorithm talks to.

Tensors are laid out ``[E, N, ...]`` (environment copy, agent). Heterogeneous agents share these
tensors exactly: observations are zero-padded to the widest agent, padded discrete actions are masked
out, padded continuous dimensions are ignored by the env and left out of log-probabilities. The true
sizes stay in :class:`EnvSpec`.

Two layers:

* :class:`MultiAgentEnv` -- one copy of a task, numpy in and out (what adapters implement; it never
  imports torch so that subprocess workers stay light);
* :class:`BatchedEnv` -- ``E`` copies stepped together, torch in and out, with automatic reset and
  episode bookkeeping. :mod:`pamarl.envs.vector` builds one from ``E`` :class:`MultiAgentEnv` copies
  (in-process or in subprocesses); a natively batched simulator subclasses :class:`BatchedEnv`
  directly (see :mod:`pamarl.envs.matrix`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:  # torch is imported lazily so env workers do not pay for it
    import torch

ActionKind = Literal["discrete", "continuous"]


@dataclass(frozen=True)
class ObsLayout:
    """How a flat observation vector is laid out, for networks that need its structure (MAgent grids).

    The vector is ``[view (H * W * C, row-major H, W, C), features (F), then, with ``grid``, the agent's
    map position (x / grid, y / grid)]``. Conv encoders read the view; the mean-field radius mode reads
    the position (``round(v * grid)`` recovers the cell).
    """

    view: tuple[int, int, int]
    features: int = 0
    grid: int = 0
    """Map side in cells when the last two entries are the position (0: no position)."""


@dataclass(frozen=True)
class EnvSpec:
    """Static description of a task: sizes, action spaces and capabilities."""

    agent_ids: tuple[str, ...]
    obs_dims: tuple[int, ...]
    """True observation size of each agent (the tensors are padded to ``obs_dim``)."""
    state_dim: int
    action_kind: ActionKind
    action_dims: tuple[int, ...]
    """Number of actions (discrete) or action dimensions (continuous) of each agent."""
    action_low: tuple[tuple[float, ...], ...] | None = None
    action_high: tuple[tuple[float, ...], ...] | None = None
    has_action_mask: bool = False
    """Whether the env can forbid actions (the mask is always provided; it is all-true otherwise)."""
    has_cost: bool = False
    """Whether the env emits a per-step safety cost."""
    episode_limit: int | None = None
    team_reward: bool = False
    """All agents receive the same reward each step."""
    cooperative: bool = True
    """The learning agents share one goal. On such tasks the run's ``reward=auto`` means ``team`` (every
    agent trains on the sum of the agents' rewards); on mixed tasks it means ``individual``."""
    obs_layout: ObsLayout | None = None
    """Structure of the observation vector (None: a plain feature vector)."""

    def __post_init__(self) -> None:
        n = len(self.agent_ids)
        if len(self.obs_dims) != n or len(self.action_dims) != n:
            raise ValueError(
                f"EnvSpec: {n} agents but {len(self.obs_dims)} obs sizes and {len(self.action_dims)} "
                "action sizes; give one of each per agent"
            )
        if self.action_kind not in ("discrete", "continuous"):
            raise ValueError(f"EnvSpec: action_kind must be 'discrete' or 'continuous', got {self.action_kind!r}")
        if self.action_kind == "continuous" and (self.action_low is None or self.action_high is None):
            raise ValueError("EnvSpec: continuous actions need action_low and action_high per agent")

    @property
    def n_agents(self) -> int:
        return len(self.agent_ids)

    @property
    def obs_dim(self) -> int:
        """Padded observation width: the widest agent's observation."""
        return max(self.obs_dims)

    @property
    def act_dim(self) -> int:
        """Padded action width: most actions (discrete) or most dimensions (continuous)."""
        return max(self.action_dims)

    @property
    def discrete(self) -> bool:
        return self.action_kind == "discrete"

    def padded_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """``[N, act_dim]`` low/high bounds, padded dimensions set to [-1, 1]."""
        low = -np.ones((self.n_agents, self.act_dim), np.float32)
        high = np.ones((self.n_agents, self.act_dim), np.float32)
        if self.action_low is not None and self.action_high is not None:
            for i, (lo, hi) in enumerate(zip(self.action_low, self.action_high)):
                low[i, : len(lo)] = lo
                high[i, : len(hi)] = hi
        return low, high

    def action_dim_mask(self) -> np.ndarray:
        """``[N, act_dim]`` bool: which padded action slots are real for each agent."""
        m = np.zeros((self.n_agents, self.act_dim), bool)
        for i, d in enumerate(self.action_dims):
            m[i, :d] = True
        return m


@dataclass
class EpisodeStats:
    """One finished episode of one env copy."""

    team_return: float
    """Undiscounted team return: the sum over agents of their episode returns."""
    agent_returns: list[float]
    length: int
    cost: float = 0.0
    """Undiscounted episode cost (team cost: the mean over agents of their per-step costs, summed)."""
    truncated: bool = False


class EpisodeBatch(Sequence[EpisodeStats]):
    """Episodes that ended together at one step of a batched simulator, kept as a tensor on its device.

    Its length is known without reading the tensor; the first read of an item copies the returns to the
    host once and builds the :class:`EpisodeStats`. A GPU simulator thus pays no host round trip per step:
    the collector reads the episodes of a whole rollout after it (:class:`pamarl.collect.EnvCollector`).
    """

    def __init__(self, agent_returns: Any, length: int, truncated: bool):
        self._returns = agent_returns  # [K, N] tensor
        self._length = length
        self._truncated = truncated
        self._items: list[EpisodeStats] | None = None

    def __len__(self) -> int:
        return int(self._returns.shape[0])

    def _read(self) -> list[EpisodeStats]:
        if self._items is None:
            rets = self._returns.tolist()
            self._items = [EpisodeStats(team_return=sum(r), agent_returns=r, length=self._length,
                                        truncated=self._truncated) for r in rets]
        return self._items

    def __getitem__(self, i: Any) -> Any:
        return self._read()[i]


@dataclass
class EnvStep:
    """What one single-copy step returns (numpy; see :class:`MultiAgentEnv`)."""

    obs: np.ndarray  # [N, obs_dim] float32
    state: np.ndarray  # [state_dim] float32
    action_mask: np.ndarray  # [N, act_dim] bool
    active: np.ndarray  # [N] bool
    reward: np.ndarray  # [N] float32
    cost: np.ndarray | None  # [N] float32
    terminated: bool
    truncated: bool


@dataclass
class EnvObs:
    """What one single-copy reset returns (numpy)."""

    obs: np.ndarray
    state: np.ndarray
    action_mask: np.ndarray
    active: np.ndarray


class MultiAgentEnv(ABC):
    """One copy of a multi-agent task in numpy, already padded to the spec's widths.

    ``step`` takes ``[N]`` int actions (discrete) or ``[N, act_dim]`` float actions (continuous,
    already clipped to the bounds). When ``terminated`` or ``truncated`` is returned the caller
    resets; agents that leave before the end are reported with ``active = False``.
    """

    spec: EnvSpec

    @abstractmethod
    def reset(self, seed: int | None = None) -> EnvObs: ...

    @abstractmethod
    def step(self, actions: np.ndarray) -> EnvStep: ...

    def render(self) -> np.ndarray | None:
        """An RGB frame ``[H, W, 3]`` uint8, or None if the task cannot render."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


@dataclass
class BatchObs:
    """Observation of ``E`` copies (torch)."""

    obs: torch.Tensor  # [E, N, obs_dim]
    state: torch.Tensor  # [E, state_dim]
    action_mask: torch.Tensor  # [E, N, act_dim] bool
    active: torch.Tensor  # [E, N] bool
    first: torch.Tensor  # [E] bool
    """True where this observation starts an episode (after a reset or an automatic reset): recurrent
    agents reset their hidden state exactly there."""


@dataclass
class BatchStep:
    """Result of stepping ``E`` copies (torch).

    ``next`` is what the agents act on next: after an episode ends it is already the first
    observation of the following episode. ``final`` is the true last observation of the episode that
    just ended (equal to ``next`` where nothing ended); bootstrapping on truncation reads it.
    """

    next: BatchObs
    final: BatchObs
    reward: torch.Tensor  # [E, N]
    cost: torch.Tensor | None  # [E, N]
    terminated: torch.Tensor  # [E] bool
    truncated: torch.Tensor  # [E] bool
    episodes: Sequence[EpisodeStats] = field(default_factory=list)
    """The episodes that ended at this step (a list, or an :class:`EpisodeBatch` read lazily)."""


class BatchedEnv(ABC):
    """``E`` copies of a task stepped together, with automatic reset and episode bookkeeping."""

    spec: EnvSpec
    num_envs: int

    @abstractmethod
    def reset(self, seed: int | None = None) -> BatchObs:
        """Reset every copy; copy ``i`` is seeded with ``seed + i`` when a seed is given."""

    @abstractmethod
    def step(self, actions: torch.Tensor) -> BatchStep:
        """Step every copy with ``[E, N]`` (discrete) or ``[E, N, act_dim]`` (continuous) actions."""

    def render(self, index: int = 0) -> np.ndarray | None:
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self) -> BatchedEnv:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
