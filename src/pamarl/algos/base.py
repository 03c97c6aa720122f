"""What every algorithm provides to the runner."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from pamarl.config import TrainConfig
from pamarl.envs.base import BatchObs, BatchStep, EnvSpec
from pamarl.errors import UsageError

Metrics = dict[str, float | str]


@dataclass
class LearnerConfig:
    """Hyperparameters every learning algorithm has; each family's config extends this one."""

    lr: float = 5e-4
    """Learning rate (Adam) of the actors, or of the Q-networks and mixer."""
    adam_eps: float = 1e-5
    """Adam epsilon."""
    gamma: float = 0.99
    """Discount factor."""
    max_grad_norm: float = 10.0
    """Gradient norm clip per agent (0 disables)."""
    hidden: tuple[int, ...] = (128, 128)
    """Hidden layer sizes of the agent networks and critics."""
    activation: str = "relu"
    """relu, tanh or elu."""
    share_params: bool = False
    """One network for all agents (default: one per agent)."""
    agent_id: bool = False
    """With share_params, append a one-hot agent id to the network inputs."""


@dataclass
class ActOut:
    """Actions for the env plus whatever the algorithm wants to store with the transition."""

    env_action: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Progress:
    """Where training stands when an update starts."""

    iteration: int
    """Iterations completed before this update (the spec's e)."""
    total_iterations: int
    env_steps: int

    @property
    def fraction(self) -> float:
        """p = min(1, e / e_total)."""
        return min(1.0, self.iteration / max(1, self.total_iterations))


class Algorithm(ABC):
    """A learner: acts, observes transitions, updates once per iteration, saves its state.

    Subclasses set ``name`` and ``Config`` (a dataclass whose fields are the algorithm's
    hyperparameters) and register with :func:`pamarl.algos.registry.register`.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    action_kinds: ClassVar[tuple[str, ...]] = ("discrete", "continuous")
    paper: ClassVar[str] = ""

    def __init__(self, spec: EnvSpec, cfg: Any, run: TrainConfig, device: torch.device):
        self.check_env(spec)
        self.spec = spec
        self.cfg = cfg
        self.run = run
        self.device = device
        # Sampling has its own generator so that checkpoints can restore it exactly.
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(run.seed)

    @classmethod
    def check_env(cls, spec: EnvSpec) -> None:
        """Refuse tasks this algorithm cannot run, saying why."""
        if spec.action_kind not in cls.action_kinds:
            raise UsageError(
                f"algorithm {cls.name!r} supports {' and '.join(cls.action_kinds)} actions only, but this "
                f"task's actions are {spec.action_kind}"
                + (" (MPE tasks take ?continuous=true)" if spec.action_kind == "discrete" else "")
            )

    @abstractmethod
    def act(self, obs: BatchObs, explore: bool = True) -> ActOut:
        """Choose actions for ``[E, N]`` agents."""

    @abstractmethod
    def observe(self, obs: BatchObs, out: ActOut, step: BatchStep) -> None:
        """Store one transition of every env copy."""

    @abstractmethod
    def update(self, progress: Progress) -> Metrics:
        """Learn from what was observed since the last update; return metrics to log."""

    def reset_rollout(self) -> None:  # noqa: B027 - optional hook
        """Forget the unfinished part of a rollout (called when the runner resets the envs)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: parameters, optimiser states, normalisers, RNG."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def _rng_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def _load_rng_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
