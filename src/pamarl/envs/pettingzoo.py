"""Generic adapter: any PettingZoo ``ParallelEnv`` as a :class:`~pamarl.envs.base.MultiAgentEnv`.

Observations are flattened and zero-padded to the widest learning agent; a ``Dict`` observation with
``"observation"`` and ``"action_mask"`` keys (PettingZoo's convention) supplies the action mask.
Agents not in the learning team (``agents=``) are driven by ``other_policy`` (random by default).
The global state is ``env.state()`` where the env provides it, else the concatenation of the padded
observations of every learning agent.

An episode ends when every learning agent has left. It counts as *truncated* (time limit: the
learner bootstraps) when the last flags are truncations, and as *terminated* otherwise. An agent
that leaves early is reported inactive with zero observation and reward until the episode ends.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from gymnasium import spaces

from pamarl.envs.base import EnvObs, EnvSpec, EnvStep, MultiAgentEnv

OtherPolicy = Callable[[str, Any, spaces.Space, np.random.Generator], Any]
"""``(agent_id, observation, action_space, rng) -> action`` for agents outside the learning team."""


def random_policy(agent: str, obs: Any, space: spaces.Space, rng: np.random.Generator) -> Any:
    """Uniformly random action (respecting a PettingZoo action mask when one is given)."""
    if isinstance(space, spaces.Discrete):
        if isinstance(obs, dict) and "action_mask" in obs:
            legal = np.flatnonzero(obs["action_mask"])
            return int(space.start + rng.choice(legal))
        return int(space.start + rng.integers(space.n))
    if isinstance(space, spaces.Box):
        return rng.uniform(space.low, space.high).astype(space.dtype)
    raise TypeError(f"random_policy: unsupported action space {space}")


def _obs_size(space: spaces.Space) -> int:
    if isinstance(space, spaces.Dict) and "observation" in space.spaces:
        return _obs_size(space["observation"])
    if isinstance(space, spaces.Discrete):
        return int(space.n)
    return int(spaces.flatdim(space))


def _flatten_obs(space: spaces.Space, obs: Any) -> np.ndarray:
    if isinstance(space, spaces.Dict) and "observation" in space.spaces:
        return _flatten_obs(space["observation"], obs["observation"])
    if isinstance(space, spaces.Box):
        return np.asarray(obs, np.float32).reshape(-1)
    return np.asarray(spaces.flatten(space, obs), np.float32)


class PettingZooEnv(MultiAgentEnv):
    """Wrap a PettingZoo ``ParallelEnv`` (or a zero-argument factory for one).

    Args:
        env: the ParallelEnv or a factory.
        agents: learning team (default: every possible agent).
        other_policy: policy of the agents outside the team.
        state: ``"auto"`` (``env.state()`` if it works, else concatenated observations), ``"env"`` or
            ``"concat"``.
        episode_limit: stated in the spec (the env enforces its own limit).
        team_reward: declare that all agents share one reward.
        cooperative: declare that the learning team shares one goal (``reward=auto`` then trains every
            agent on the team's summed reward); False for mixed tasks.
    """

    def __init__(
        self,
        env: Any,
        agents: Sequence[str] | None = None,
        other_policy: OtherPolicy = random_policy,
        state: str = "auto",
        episode_limit: int | None = None,
        team_reward: bool = False,
        seed: int | None = None,
        cooperative: bool = True,
    ):
        self.env = env() if callable(env) and not hasattr(env, "possible_agents") else env
        possible = list(self.env.possible_agents)
        self.team = list(agents) if agents is not None else possible
        unknown = [a for a in self.team if a not in possible]
        if unknown:
            raise ValueError(f"PettingZooEnv: agents {unknown} are not in the env's possible_agents {possible}")
        self.others = [a for a in possible if a not in self.team]
        self.other_policy = other_policy
        self._rng = np.random.default_rng(seed)

        self.obs_spaces = [self.env.observation_space(a) for a in self.team]
        self.act_spaces = [self.env.action_space(a) for a in self.team]
        kinds = {"discrete" if isinstance(s, spaces.Discrete) else "continuous" for s in self.act_spaces}
        for s in self.act_spaces:
            if not isinstance(s, spaces.Discrete | spaces.Box):
                raise TypeError(f"PettingZooEnv: action space {s} is neither Discrete nor Box")
        if len(kinds) != 1:
            raise TypeError("PettingZooEnv: the learning team mixes discrete and continuous actions")
        kind = kinds.pop()
        self._has_mask = any(
            isinstance(s, spaces.Dict) and "action_mask" in s.spaces for s in self.obs_spaces
        )
        if kind == "discrete":
            act_dims = tuple(int(s.n) for s in self.act_spaces)
            low = high = None
        else:
            act_dims = tuple(int(np.prod(s.shape)) for s in self.act_spaces)
            low = tuple(tuple(float(x) for x in np.asarray(s.low).reshape(-1)) for s in self.act_spaces)
            high = tuple(tuple(float(x) for x in np.asarray(s.high).reshape(-1)) for s in self.act_spaces)
        obs_dims = tuple(_obs_size(s) for s in self.obs_spaces)
        self._obs_dim = max(obs_dims)
        self._act_dim = max(act_dims)

        self._state_mode = state
        first = self.env.reset(seed=seed)
        if state == "auto":
            try:
                self.env.state()
                self._state_mode = "env"
            except (NotImplementedError, AttributeError):
                self._state_mode = "concat"
        self._last_obs: dict[str, Any] = first[0] if isinstance(first, tuple) else first
        state_dim = (
            int(np.asarray(self.env.state()).size)
            if self._state_mode == "env"
            else len(self.team) * self._obs_dim
        )
        self.spec = EnvSpec(
            agent_ids=tuple(self.team),
            obs_dims=obs_dims,
            state_dim=state_dim,
            action_kind=kind,  # type: ignore[arg-type]
            action_dims=act_dims,
            action_low=low,
            action_high=high,
            has_action_mask=self._has_mask,
            episode_limit=episode_limit,
            team_reward=team_reward,
            cooperative=cooperative,
        )
        self._active = np.ones(len(self.team), bool)
        self._simple = (
            not self._has_mask
            and all(isinstance(sp, spaces.Box) for sp in self.obs_spaces)
            and len(set(obs_dims)) == 1
            and len(set(act_dims)) == 1
        )
        self._full_mask = np.ones((len(self.team), self._act_dim), bool)

    # ------------------------------------------------------------------ helpers
    def _pack(self, obs: dict[str, Any]) -> EnvObs:
        packed = self._pack_agents(obs)
        if self._state_mode == "env":
            packed.state = np.asarray(self.env.state(), np.float32).reshape(-1)
        return packed

    def _pack_agents(self, obs: dict[str, Any]) -> EnvObs:
        """Padded observations and masks; the state is the concatenation of the observations."""
        n = len(self.team)
        if self._simple and self._active.all():
            # Common case (Box observations of equal width, no masks, nobody left): no per-agent loop.
            o = np.stack([np.asarray(obs[a], np.float32).reshape(-1) for a in self.team])
            return EnvObs(obs=o, state=o.reshape(-1), action_mask=self._full_mask.copy(),
                          active=self._active.copy())
        o = np.zeros((n, self._obs_dim), np.float32)
        mask = np.zeros((n, self._act_dim), bool)
        for i, a in enumerate(self.team):
            if a in obs and self._active[i]:
                flat = _flatten_obs(self.obs_spaces[i], obs[a])
                o[i, : flat.size] = flat
            if self.spec.discrete:
                d = self.spec.action_dims[i]
                raw = obs.get(a)
                if isinstance(raw, dict) and "action_mask" in raw and self._active[i]:
                    mask[i, :d] = np.asarray(raw["action_mask"], bool)[:d]
                else:
                    mask[i, :d] = True
                if not mask[i].any():  # an agent with no legal action keeps a no-op slot
                    mask[i, 0] = True
            else:
                mask[i, : self.spec.action_dims[i]] = True
        state = (o * self._active[:, None]).reshape(-1)
        return EnvObs(obs=o, state=state, action_mask=mask, active=self._active.copy())

    def _decode(self, i: int, action: np.ndarray) -> Any:
        space = self.act_spaces[i]
        if isinstance(space, spaces.Discrete):
            return int(space.start + int(action))
        d = self.spec.action_dims[i]
        a = np.asarray(action, np.float32)[:d].reshape(space.shape)
        return np.clip(a, space.low, space.high).astype(space.dtype)

    # ------------------------------------------------------------------ API
    def reset(self, seed: int | None = None) -> EnvObs:
        if seed is not None:
            self._rng = np.random.default_rng(seed + 7919)  # scripted agents get their own stream
        out = self.env.reset(seed=seed)
        self._last_obs = out[0] if isinstance(out, tuple) else out
        self._active = np.ones(len(self.team), bool)
        return self._pack(self._last_obs)

    def step(self, actions: np.ndarray) -> EnvStep:
        live = set(self.env.agents)
        act: dict[str, Any] = {}
        for i, a in enumerate(self.team):
            if a in live:
                act[a] = self._decode(i, actions[i])
        for a in self.others:
            if a in live:
                act[a] = self.other_policy(a, self._last_obs.get(a), self.env.action_space(a), self._rng)
        obs, rew, term, trunc, _ = self.env.step(act)
        self._last_obs = obs
        reward = np.array([float(rew.get(a, 0.0)) for a in self.team], np.float32)
        reward *= self._active  # an agent that already left earns nothing
        # Pack before marking leavers inactive: an agent's last observation is real (truncation bootstraps on it).
        packed = self._pack(obs)
        any_trunc = False
        any_term = False
        for i, a in enumerate(self.team):
            if not self._active[i]:
                continue
            if term.get(a, False) or trunc.get(a, False) or a not in self.env.agents:
                self._active[i] = False
                any_term |= bool(term.get(a, False))
                any_trunc |= bool(trunc.get(a, False))
        done = not self._active.any() or not self.env.agents
        packed.active = self._active.copy()
        terminated = bool(done and not (any_trunc and not any_term))
        truncated = bool(done and not terminated)
        if done:
            packed.active = np.ones(len(self.team), bool)  # the final obs belongs to every agent
        return EnvStep(
            obs=packed.obs,
            state=packed.state,
            action_mask=packed.action_mask,
            active=packed.active,
            reward=reward,
            cost=None,
            terminated=terminated,
            truncated=truncated,
        )

    def render(self) -> np.ndarray | None:
        try:
            frame = self.env.render()
        except Exception:
            return None
        return None if frame is None else np.asarray(frame, np.uint8)

    def close(self) -> None:
        self.env.close()
