"""What every algorithm provides to the runner."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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
    """What :meth:`Algorithm.act` returns: the env's actions and what the learner stores with them."""

    env_action: torch.Tensor
    """What the env receives: ``[E, N]`` ids or ``[E, N, act_dim]`` values within the bounds (CPU or the
    env's device)."""
    action: torch.Tensor
    """The action as the learner stores it (discrete ids, or the unsquashed Gaussian sample)."""
    logp: torch.Tensor | None = None
    """``[E, N]`` log-probability of ``action`` under the acting policy (stochastic policies)."""


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
    paper: ClassVar[str] = ""
    # Capabilities, declared here so the runner, the CLI and the tests never probe with hasattr.
    action_kinds: ClassVar[tuple[str, ...]] = ("discrete", "continuous")
    """Action kinds the algorithm can run."""
    uses_cost: ClassVar[bool] = False
    """Trains on the env's cost signal (cost critics, a Lagrangian) where the task has one; the runner
    then passes the cost limit with :meth:`set_cost_limit`."""
    supports_recurrent: ClassVar[bool] = False
    """Has a recurrent variant (``rnn=true``); its hidden states reset where ``BatchObs.first`` says."""
    supports_shared_params: ClassVar[bool] = True
    """Accepts ``share_params=true``."""
    homogeneous_agents_only: ClassVar[bool] = False
    """Shares one network across interchangeable agents (mean-field methods): tasks whose agents differ in
    observation or action sizes are refused."""

    def __init__(self, spec: EnvSpec, cfg: Any, run: TrainConfig, device: torch.device):
        self.check_env(spec)
        if not self.supports_shared_params and getattr(cfg, "share_params", False):
            raise UsageError(
                f"{self.name} needs per-agent parameters: set share_params=false ({self.shared_params_why})"
            )
        self.spec = spec
        self.cfg = cfg
        self.run = run
        self.device = device
        # Sampling has its own generator, on the networks' device (a CPU generator cannot drive CUDA
        # sampling ops), so that checkpoints can restore it exactly.
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(run.seed)
        self.reward_mode = run.reward if run.reward != "auto" else ("team" if spec.cooperative else "individual")
        """The resolved reward convention (``team`` or ``individual``) the runner applies to this run."""
        self.evaluating = False
        """True inside :meth:`evaluation`: acting then uses the evaluation's own recurrent states."""
        self.cost_limit: float | None = None

    shared_params_why: ClassVar[str] = ""
    """Why ``share_params=true`` is refused, for the error message."""

    def resolved(self) -> dict[str, Any]:
        """Settings whose ``auto`` value this run resolved (written to config.yaml under ``resolved:``)."""
        return {}

    @property
    def team_rewards(self) -> bool:
        """Whether every agent's reward is already the team's (``reward=team``, the runner's convention)."""
        return self.reward_mode == "team"

    def team_reward(self, reward: torch.Tensor) -> torch.Tensor:
        """The one team reward ``[...]`` from per-agent rewards ``[..., N]``: the sum over agents.

        Under ``reward=team`` every agent already holds that sum (HARL's convention), so agent 0's is
        taken; under ``reward=individual`` the agents' own rewards are summed. Either way a mixer or a
        team critic learns the same summed team return that reports show.
        """
        return reward[..., 0] if self.team_rewards else reward.sum(-1)

    def set_cost_limit(self, limit: float) -> None:
        """Per-episode cost limit of the constraint (the runner passes the run's or the env family's)."""
        self.cost_limit = float(limit)

    @contextmanager
    def evaluation(self) -> Iterator[None]:
        """Act for an evaluation inside this block (the runner's :func:`~pamarl.runner.evaluate` uses it).

        Recurrent learners keep separate hidden states for training and evaluation, so an evaluation in
        the middle of a training rollout never disturbs the training episodes' states.
        """
        self.evaluating = True
        try:
            yield
        finally:
            self.evaluating = False

    @classmethod
    def check_env(cls, spec: EnvSpec) -> None:
        """Refuse tasks this algorithm cannot run, saying why."""
        if spec.action_kind not in cls.action_kinds:
            raise UsageError(
                f"algorithm {cls.name!r} supports {' and '.join(cls.action_kinds)} actions only, but this "
                f"task's actions are {spec.action_kind}"
                + (" (MPE tasks take ?continuous=true)" if spec.action_kind == "discrete" else "")
            )
        if cls.homogeneous_agents_only and (len(set(spec.obs_dims)) > 1 or len(set(spec.action_dims)) > 1):
            raise UsageError(f"{cls.name} shares one network across many homogeneous agents; this task's agents "
                             f"differ (observation sizes {sorted(set(spec.obs_dims))}, action counts "
                             f"{sorted(set(spec.action_dims))})")

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

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the algorithm holds outside this process (e.g. Ray actors); the runner calls it last."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: parameters, optimiser states, normalisers, RNG."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def _rng_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "device": self.device.type}

    def _load_rng_state(self, state: dict[str, Any]) -> None:
        saved = state.get("device", "cpu")
        if saved != self.device.type:
            # Generator states are device-specific; a run moved to another device continues from a
            # deterministic re-seed (documented: bit-exact resume holds on the same device type).
            self.generator.manual_seed(int(torch.as_tensor(state["generator"]).long().sum()))
            return
        self.generator.set_state(state["generator"])
