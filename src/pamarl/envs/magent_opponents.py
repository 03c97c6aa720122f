"""Opponent policies of the MAgent2 wrapper (:mod:`pamarl.envs.magent`), each one batched call per step.

An opponent sees the other team's ``[E, n_opp, ...]`` observation (the same layout as the learner's) and
returns ``[E, n_opp]`` int actions (slots of dead agents are ignored by the env).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pamarl.errors import UsageError

if TYPE_CHECKING:
    from pamarl.envs.magent import MAgentEnv


def move_deltas(cls: Any, like: Any, handles: list[Any]) -> np.ndarray:
    """``[groups, A, 2]``: the (dx, dy) each action moves an agent of each group (0 for attacks / staying).

    The engine numbers its move actions by its own table; we measure it once on a private engine copy
    built like ``like`` (one agent per group, far apart, one step per action).
    """
    probe = cls(like.map_size, like.minimap_mode, _args(like), like.max_cycles, like.extra_features, None, 0)
    g = probe.env
    hs = list(probe.handles)
    n_act = max(int(g.get_action_space(h)[0]) for h in hs)
    out = np.zeros((len(hs), n_act, 2), np.int64)
    c = like.map_size // 2
    for gi, h in enumerate(hs):
        for k in range(int(g.get_action_space(h)[0])):
            g.reset()
            g.add_agents(h, method="custom", pos=[[c, c, 0]])
            for oi, o in enumerate(hs):
                if oi != gi:
                    g.add_agents(o, method="custom", pos=[[2 + 2 * oi, 2, 0]])
            for o in hs:
                g.set_action(o, np.full(g.get_num(o), k if o is h else 0, np.int32))
            g.step()
            out[gi, k] = g.get_pos(h)[0] - np.array([c, c])
    probe.close()
    return out


def _args(like: Any) -> dict[str, Any]:
    # magent2's _parallel_env keeps its constructor arguments for pickling (EzPickle).
    return dict(like._ezpickle_args[2])


class Opponent:
    """Base: random actions."""

    def __init__(self, env: MAgentEnv, explore: bool = False, refresh: int = 50):
        self.rng = np.random.default_rng(0)
        self.explore = explore
        self.refresh = refresh

    def seed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed + 7919)

    def act(self, env: MAgentEnv) -> np.ndarray:
        return self.rng.integers(0, env.n_actions_opp, size=(env.num_envs, env.n_opp))

    def episode_finished(self, env: MAgentEnv) -> None:  # noqa: B027 - optional hook
        pass

    def attach(self, algo: Any, env: MAgentEnv) -> None:  # noqa: B027 - optional hook
        pass


class StillOpponent(Opponent):
    """The other side does nothing (action of zero displacement)."""

    def act(self, env: MAgentEnv) -> np.ndarray:
        d = env.moves(1)
        stay = int(np.nonzero((d == 0).all(1))[0][0])
        return np.full((env.num_envs, env.n_opp), stay)


class ScriptOpponent(Opponent):
    """Attack the weakest enemy in attack range; else step towards the nearest enemy in view; else towards
    the enemy team's centre. Vectorised over the team."""

    def __init__(self, env: MAgentEnv, explore: bool = False, refresh: int = 50, role: int = 1):
        super().__init__(env, explore, refresh)
        self._v2a: dict[int, tuple[int, np.ndarray]] = {}
        self.role = role
        """Which team it plays: 1 the env's opponent, 0 the learner's side (``pamarl battle``)."""

    def act(self, env: MAgentEnv) -> np.ndarray:
        H, W, C = env.layouts[self.role].view
        per_group = 3 if env.minimap else 2
        pres, hp_ch = 1 + per_group, 2 + per_group
        me, foe = self.role, 1 - self.role
        moves = env.moves(me).astype(np.float32)
        is_move = (np.abs(moves).sum(1) > 0)
        stay = int(np.nonzero(~is_move)[0][0])
        dy, dx = np.mgrid[0:H, 0:W]
        dx, dy = dx - W // 2, dy - H // 2
        dist = (np.abs(dx) + np.abs(dy)).astype(np.float32).reshape(-1)
        out = np.full((env.num_envs, env.role_size(me)), stay, np.int64)
        for e in range(env.num_envs):
            alive = env._alive[me][e]
            if not alive.any():
                continue
            gi = env.handles.index(env.role_handle(e, me))
            if gi not in self._v2a:
                self._v2a[gi] = env.copies[e].env.get_view2attack(env.role_handle(e, me))
            base, v2a = self._v2a[gi]
            idx = np.nonzero(alive)[0]
            view = env._obs[me][e, idx, : H * W * C].reshape(len(idx), H, W, C)
            enemy = view[..., pres] > 0
            hp = view[..., hp_ch]
            att = (enemy & (v2a >= 0)[None]).reshape(len(idx), -1)
            score = np.where(att, hp.reshape(len(idx), -1), np.inf)
            cell = score.argmin(1)
            can = att.any(1)
            acts = np.full(len(idx), stay, np.int64)
            acts[can] = base + v2a.reshape(-1)[cell[can]]
            near = np.where(enemy.reshape(len(idx), -1), dist[None], np.inf)
            ncell = near.argmin(1)
            seen = np.isfinite(near.min(1))
            direction = np.stack([dx.reshape(-1)[ncell], dy.reshape(-1)[ncell]], 1).astype(np.float32)
            foes = env._alive[foe][e]
            if foes.any():
                centre = env._obs[foe][e, foes, -2:].mean(0) * env.map_size
                mine = env._obs[me][e, idx, -2:] * env.map_size
                direction = np.where(seen[:, None], direction, centre[None] - mine)
            # end next to the target (Chebyshev distance 1: in attack range), not on it (it is occupied)
            rest = direction[:, None, :] - moves[None]
            cost = (np.abs(rest).max(-1) - 1) ** 2 + 0.1 * (rest ** 2).sum(-1)
            cost[:, ~is_move] = np.inf
            cost[:, stay] = (np.abs(direction).max(-1) - 1) ** 2 + 0.1 * (direction ** 2).sum(-1)
            mv = cost.argmin(1)
            acts[~can] = mv[~can]
            out[e, idx] = acts
        return out


class PolicyOpponent(Opponent):
    """A frozen learner: a checkpoint, or a lagged copy of the learner (self-play)."""

    def __init__(self, env: MAgentEnv, explore: bool = False, refresh: int = 50, path: str | None = None,
                 pool: int = 1):
        super().__init__(env, explore, refresh)
        self.self_play = path is None
        self.pool: list[dict[str, Any]] = []
        self.pool_size = max(1, int(pool))
        """Self-play: snapshots kept; at each refresh the newest joins and the opponent plays a uniformly drawn one."""
        self.algo: Any = None
        self.learner: Any = None
        self.refreshes = 0
        self._since = 0
        if path is not None:
            self.algo = load_policy(path, env)

    def attach(self, algo: Any, env: MAgentEnv) -> None:
        if self.self_play:
            self.learner = algo
            self.algo = clone_policy(algo, env.num_envs)
            self.refreshes = 1

    def episode_finished(self, env: MAgentEnv) -> None:
        if self.learner is None:
            return
        self._since += 1
        if self.refresh > 0 and self._since >= self.refresh:
            self._since = 0
            self.refreshes += 1
            if self.pool_size == 1:
                load_weights(self.algo, self.learner)
                return
            self.pool = (self.pool + [copy.deepcopy(_weights(self.learner))])[-self.pool_size:]
            pick = self.pool[int(self.rng.integers(len(self.pool)))]
            f = getattr(self.algo, "load_policy_state_dict", None)
            (f if f is not None else self.algo.load_state_dict)(pick)

    @torch.no_grad()
    def act(self, env: MAgentEnv) -> np.ndarray:
        if self.algo is None:
            return super().act(env)
        out = self.algo.act(env.opponent_obs(), explore=self.explore)
        return out.env_action.reshape(env.num_envs, env.n_opp).cpu().numpy()


def _weights(algo: Any) -> dict[str, Any]:
    f = getattr(algo, "policy_state_dict", None)
    return f() if f is not None else algo.state_dict()


def load_weights(dst: Any, src: Any) -> None:
    f = getattr(dst, "load_policy_state_dict", None)
    (f if f is not None else dst.load_state_dict)(_weights(src))


def clone_policy(algo: Any, num_envs: int) -> Any:
    """A frozen copy of ``algo`` acting on ``num_envs`` copies, with the same weights."""
    run = dataclasses.replace(algo.run, num_envs=num_envs)
    twin = type(algo)(algo.spec, algo.cfg, run, algo.device)
    load_weights(twin, algo)
    return twin


def load_policy(path: str, env: MAgentEnv, role: int = 1) -> Any:
    """A trained algorithm from a run directory (its ``checkpoints/final.pt`` or ``latest.pt``) or a
    checkpoint file inside one, rebuilt for this env's opponent team (``role=1``) or learner team (0)."""
    from pamarl.checkpoint import load_checkpoint
    from pamarl.runner import load_run_config, make_algorithm

    p = Path(path)
    if p.is_dir():
        ck = next((p / "checkpoints" / n for n in ("final.pt", "latest.pt") if (p / "checkpoints" / n).is_file()), None)
        run_dir = p
    else:
        ck, run_dir = p, p.parent.parent
    if ck is None or not ck.is_file() or not (run_dir / "config.yaml").is_file():
        raise UsageError(f"opponent=checkpoint:{path}: give a pamarl run directory (with config.yaml and "
                         "checkpoints/final.pt) or a checkpoint file inside one")
    run, cfg = load_run_config(run_dir)
    run = dataclasses.replace(run, num_envs=env.num_envs, device="cpu")
    spec = env.spec
    if role == 1:
        n, d = env.n_opp, env.role_obs_dim[1]
        spec = dataclasses.replace(spec, agent_ids=tuple(f"agent_{i}" for i in range(n)), obs_dims=(d,) * n,
                                   action_dims=(env.n_actions_opp,) * n, obs_layout=env.layouts[1])
    algo = make_algorithm(run, cfg, spec)
    state = load_checkpoint(ck)["algo"]
    try:
        f = getattr(algo, "load_policy_state_dict", None)
        (f if f is not None else algo.load_state_dict)(state)
    except (KeyError, RuntimeError, ValueError) as e:
        raise UsageError(f"opponent=checkpoint:{path} does not fit this task's opponent team: {e}") from e
    return algo


def make_opponent(kind: str, env: MAgentEnv, explore: bool = False, refresh: int = 50, pool: int = 1) -> Opponent:
    kind = str(kind)
    if kind == "random":
        return Opponent(env, explore, refresh)
    if kind == "none":
        return StillOpponent(env, explore, refresh)
    if kind == "script":
        return ScriptOpponent(env, explore, refresh)
    if kind == "self":
        if not env.info.symmetric:
            raise UsageError(f"opponent=self needs a symmetric task (battle_v4, battlefield_v5), not {env.task}")
        return PolicyOpponent(env, explore, refresh, pool=pool)
    if kind.startswith("checkpoint:"):
        return PolicyOpponent(env, explore, 0, path=kind.split(":", 1)[1])
    raise UsageError(f"unknown opponent {kind!r}: use random, none, script, self or checkpoint:PATH")
