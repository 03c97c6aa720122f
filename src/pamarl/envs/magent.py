"""MAgent2 grid battles, natively batched: ``E`` engine copies driven through the per-team interface.

Ids: ``magent2/<task>?map_size=40&max_cycles=400&opponent=random`` with tasks ``battle_v4``,
``battlefield_v5``, ``adversarial_pursuit_v4``, ``gather_v5`` and ``tiger_deer_v4``. Each copy is the
engine's ``GridWorld`` as configured by magent2's own task module (its map generator and reward rules);
every step calls ``set_action / step / get_reward / get_alive / get_observation / clear_dead`` once per
team, never the per-agent PettingZoo dicts (which cost about 3x).

Layout. The learning team's agents are the ``N`` slots of the ``[E, N, ...]`` tensors (``N`` = the
team's initial size); an agent's slot is its engine id minus the team's first id, so it keeps its slot
for the whole episode. An observation is the agent's view (``H x W x C``) flattened, then its feature
vector (``extra_features=true``: id embedding, last action, last reward; ``minimap_mode=true`` alone: the
position features), then its map position ``(x, y) / map_size`` (see :class:`pamarl.envs.base.ObsLayout`).
The global ``state`` is small on purpose (maps hold 1,000s of agents): each team's alive fraction and
mean HP, and the time fraction.

Deaths. An agent killed at step ``t`` gets its reward of that step (including ``dead_penalty``), is
``active`` at ``t`` and inactive in ``final`` -- its transition is terminal for it -- and stays inactive
until the episode ends. An episode *terminates* when a side is wiped out (or the engine says so) and is
*truncated* at ``max_cycles``. Rewards are per agent (``team_reward=False``).

Opponents (``opponent=``, computed inside the wrapper with one batched call per step):

* ``random`` -- uniform actions; ``none`` -- the other side stands still (gather_v5 has no other side);
* ``script`` -- attack the weakest enemy in attack range, else move towards the nearest enemy in view,
  else towards the enemy team's centre (MAgent2 ships no scripted policy; this is ours);
* ``checkpoint:PATH`` -- a frozen trained model: a run directory or a checkpoint file inside one;
* ``self`` -- a lagged copy of the learner, refreshed every ``self_refresh`` finished episodes (counted
  over all copies) with the learner's current parameters; with ``self_pool=K > 1`` each refresh adds the
  learner's parameters to a pool of the last ``K`` snapshots and the opponent plays one drawn uniformly from
  it until the next refresh. The runner attaches the learner (:meth:`MAgentEnv.attach_learner`); until then
  the opponent plays randomly.

Sides. In the symmetric battles (``battle_v4``, ``battlefield_v5``) with ``swap=true`` (default) the
learning team alternates between the red (left) and blue (right) group from one episode to the next
(copy ``i`` starts on side ``i % 2``). In the asymmetric tasks ``team=`` picks the learning side
(pursuit: 0 predators / 1 prey; tiger_deer: 0 deer / 1 tigers, default tigers).

Outcomes of finished episodes are kept in :attr:`MAgentEnv.outcomes` (survivors, kills, returns, winner
by :func:`winner`) for ``pamarl battle``.

Length: about 480 lines of one concern, one batched engine copy set: the five tasks' options, the per-team
step with alive masks and terminal transitions, and the array-level step that the subprocess workers
(:mod:`pamarl.envs.magent_workers`) share; splitting it would spread one state machine over two files.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pamarl.envs.base import BatchedEnv, BatchObs, BatchStep, EnvSpec, EpisodeStats, ObsLayout
from pamarl.envs.magent_opponents import Opponent, make_opponent, move_deltas
from pamarl.envs.registry import EnvFamily, register_family
from pamarl.errors import UsageError


@dataclass(frozen=True)
class TaskInfo:
    module: str
    description: str
    map_size: int
    max_cycles: int
    symmetric: bool
    default_team: int = 0
    reward_args_name: str = "default_reward_args"


TASKS: dict[str, TaskInfo] = {
    "battle_v4": TaskInfo("magent2.environments.battle.battle", "two equal armies fight (map 45: 81 v 81)", 45, 1000,
                          True),
    "battlefield_v5": TaskInfo("magent2.environments.battlefield.battlefield",
                               "two armies fight among walls (map 80)", 80, 1000, True),
    "adversarial_pursuit_v4": TaskInfo("magent2.environments.adversarial_pursuit.adversarial_pursuit",
                                       "predators (team 0) tag prey (team 1)", 45, 500, False, 0),
    "gather_v5": TaskInfo("magent2.environments.gather.gather", "omnivores gather food (one team)", 200, 500, False),
    "tiger_deer_v4": TaskInfo("magent2.environments.tiger_deer.tiger_deer",
                              "tigers (team 1, default) hunt deer (team 0)", 45, 300, False, 1, "default_env_args"),
}


def winner(alive: tuple[int, int], hp: tuple[float, float] = (0.0, 0.0)) -> float:
    """The documented win rule, from the learner's side: 1 win, 0 loss, 0.5 draw.

    The side with more survivors wins (a wiped-out side has none); equal survivors: more total HP wins;
    equal HP too: a draw.
    """
    if alive[0] != alive[1]:
        return 1.0 if alive[0] > alive[1] else 0.0
    if abs(hp[0] - hp[1]) > 1e-6:
        return 1.0 if hp[0] > hp[1] else 0.0
    return 0.5


def check_actions(actions: Any, task: str, num_envs: int, n: int, n_actions: int) -> np.ndarray:
    """The learner's ``[E, N]`` actions as int32 numpy, checked (bad ones would corrupt the engine)."""
    a = torch.as_tensor(actions).detach().cpu().numpy().astype(np.int32)
    if a.shape != (num_envs, n):
        raise UsageError(f"magent2/{task}: actions must be [E, N] = {(num_envs, n)}, got {tuple(a.shape)}")
    if a.size and (a.min() < 0 or a.max() >= n_actions):
        raise UsageError(f"magent2/{task}: actions must lie in [0, {n_actions})")
    return a


class MAgentEnv(BatchedEnv):
    """``E`` MAgent2 engine copies; the learner plays one team, an opponent policy the other."""

    def __init__(self, task: str, num_envs: int = 1, seed: int | None = None, device: str = "cpu",
                 map_size: int | None = None, max_cycles: int | None = None, minimap_mode: bool = False,
                 extra_features: bool = False, opponent: str = "random", team: int | None = None, swap: bool = True,
                 self_refresh: int = 50, self_pool: int = 1, opponent_explore: bool = False, copy_offset: int = 0,
                 **reward_args: Any):
        info = TASKS[task]
        mod = importlib.import_module(info.module)
        defaults = dict(getattr(mod, info.reward_args_name, {}))
        unknown = set(reward_args) - set(defaults)
        if unknown:
            raise UsageError(f"magent2/{task}: unknown option(s) {sorted(unknown)}; "
                             f"reward options: {sorted(defaults)}; "
                             "others: map_size, max_cycles, minimap_mode, extra_features, opponent, team, swap, "
                             "self_refresh, self_pool, opponent_explore")
        self.copy_offset = int(copy_offset)
        """Global index of this object's first copy (subprocess workers hold a slice of the copies): copy ``i``
        is seeded ``seed + copy_offset + i`` and starts on side ``(team + copy_offset + i) % 2``."""
        self.task, self.info = task, info
        self.num_envs = int(num_envs)
        self.device = torch.device(device)
        self.map_size = int(map_size if map_size is not None else info.map_size)
        self.max_cycles = int(max_cycles if max_cycles is not None else info.max_cycles)
        if self.map_size < 12 or self.max_cycles < 1:
            raise UsageError(f"magent2/{task}: map_size must be >= 12 and max_cycles >= 1")
        self.minimap, self.extra = bool(minimap_mode), bool(extra_features)
        args = {**defaults, **reward_args}
        cls = mod._parallel_env
        base_seed = 0 if seed is None else int(seed)
        try:
            self.copies = [cls(self.map_size, self.minimap, args, self.max_cycles, self.extra, None,
                               base_seed + self.copy_offset + i) for i in range(self.num_envs)]
        except AssertionError as e:  # magent2 checks its arguments with asserts (e.g. the smallest map)
            raise UsageError(f"magent2/{task}: {e}") from e
        self.handles = list(self.copies[0].handles)
        self.two_teams = len(self.handles) == 2
        lt = info.default_team if team is None else int(team)
        if lt not in range(len(self.handles)):
            raise UsageError(f"magent2/{task}: team must be one of {list(range(len(self.handles)))}, got {team}")
        self.swap = bool(swap) and info.symmetric
        g0 = self.copies[0].env
        sizes = [g0.get_num(h) for h in self.handles]
        if info.symmetric:
            self.n = max(sizes)
            self.n_opp = self.n
        else:
            self.n = sizes[lt]
            self.n_opp = sizes[1 - lt] if self.two_teams else 0
        self.side = np.array([(lt + self.copy_offset + i) % 2 if self.swap else lt for i in range(self.num_envs)],
                             dtype=np.int64)
        hv = self.handles[lt]
        # Per role (0 learner, 1 opponent): the teams of the asymmetric tasks see different views.
        self.layouts: list[ObsLayout] = []
        for h in [hv] + ([self.handles[1 - lt]] if self.two_teams else []):
            f = int(g0.get_feature_space(h)[0])
            view = tuple(int(x) for x in g0.get_view_space(h))
            self.layouts.append(ObsLayout(view=(view[0], view[1], view[2]),
                                          features=f if self.extra else (2 if self.minimap else 0), grid=self.map_size))
        self.role_obs_dim = [int(np.prod(la.view)) + la.features + 2 for la in self.layouts]
        self.view, self.feat, self.obs_dim = self.layouts[0].view, self.layouts[0].features, self.role_obs_dim[0]
        self.n_actions = int(g0.get_action_space(hv)[0])
        self.n_actions_opp = int(g0.get_action_space(self.handles[1 - lt])[0]) if self.two_teams else 0
        if info.symmetric and self.n_actions_opp != self.n_actions:
            raise UsageError(f"magent2/{task}: the two teams differ; cannot swap sides")
        self.spec = EnvSpec(
            agent_ids=tuple(f"agent_{i}" for i in range(self.n)),
            obs_dims=(self.obs_dim,) * self.n,
            state_dim=5,
            action_kind="discrete",
            action_dims=(self.n_actions,) * self.n,
            episode_limit=self.max_cycles,
            team_reward=False,
            cooperative=False,  # individual rewards by default (the run's reward=auto)
            obs_layout=self.layouts[0],
        )
        E = self.num_envs
        self._base = np.zeros((E, len(self.handles)), np.int64)
        self._init_size = np.zeros((E, len(self.handles)), np.int64)
        self._t = np.zeros(E, np.int64)
        self._ret = np.zeros((E, self.n), np.float64)
        self._opp_ret = np.zeros(E, np.float64)
        self._episodes_done = 0
        self.outcomes: list[dict[str, float]] = []
        self._rng = np.random.default_rng(base_seed)
        self.opponent_kind = opponent
        self.opponent: Opponent | None = None
        if self.two_teams:
            if opponent != "external":  # external: the caller passes the opponent's actions to step_arrays
                self.opponent = make_opponent(opponent, self, explore=bool(opponent_explore),
                                              refresh=int(self_refresh), pool=int(self_pool))
        elif opponent not in ("random", "none", "external"):
            raise UsageError(f"magent2/{task} has one team; it takes no opponent (got opponent={opponent!r})")
        self._deltas: np.ndarray | None = None
        self._obs: list[np.ndarray] = []  # per role: [E, n_role, obs_dim]
        self._alive: list[np.ndarray] = []
        self._hp = np.zeros((E, 2), np.float32)
        self._first = np.ones(E, bool)

    # ------------------------------------------------------------------ engine access
    def role_handle(self, e: int, role: int) -> Any:
        """Engine group handle of the learner (role 0) or the opponent (role 1) in copy ``e``."""
        return self.handles[int(self.side[e]) if role == 0 else 1 - int(self.side[e])]

    def role_size(self, role: int) -> int:
        return self.n if role == 0 else self.n_opp

    def moves(self, role: int) -> np.ndarray:
        """``[A, 2]`` (dx, dy) of each action of ``role``'s agents (attacks and stay: 0), probed once."""
        if self._deltas is None:
            cls = importlib.import_module(self.info.module)._parallel_env
            self._deltas = move_deltas(cls, self.copies[0], self.handles)
        return self._deltas[int(self.side[0]) if role == 0 else 1 - int(self.side[0])]

    def _read(self, e: int, obs: list[np.ndarray], alive: list[np.ndarray], pre_clear: bool) -> None:
        """Fill copy ``e``'s rows of ``obs``/``alive`` for both roles from the engine."""
        g = self.copies[e].env
        for role in range(2 if self.two_teams else 1):
            h = self.role_handle(e, role)
            gi = self.handles.index(h)
            ids = g.get_agent_id(h)
            slots = ids - self._base[e, gi]
            view, feat = g.get_observation(h)
            ob = obs[role][e]
            ob.fill(0.0)
            al = alive[role][e]
            al.fill(False)
            if len(ids) == 0:
                continue
            nv = view.shape[1] * view.shape[2] * view.shape[3]
            ob[slots, :nv] = view.reshape(len(ids), -1)
            nf = self.layouts[role].features
            if nf:
                ob[slots, nv:nv + nf] = feat[:, -nf:] if not self.extra else feat
            ob[slots, -2:] = g.get_pos(h) / float(self.map_size)
            al[slots] = g.get_alive(h) if pre_clear else True
            hp_ch = 2  # my_team_hp channel at the agent's own (centre) cell
            hp = view[:, view.shape[1] // 2, view.shape[2] // 2, hp_ch]
            self._hp[e, role] = float((hp * al[slots]).sum())

    def _state(self) -> np.ndarray:
        E = self.num_envs
        s = np.zeros((E, 5), np.float32)
        s[:, 0] = self._alive[0].sum(1) / max(1, self.n)
        s[:, 1] = self._hp[:, 0] / max(1, self.n)
        if self.two_teams:
            s[:, 2] = self._alive[1].sum(1) / max(1, self.n_opp)
            s[:, 3] = self._hp[:, 1] / max(1, self.n_opp)
        s[:, 4] = self._t / self.max_cycles
        return s

    def _reset_copy(self, e: int, seed: int | None) -> None:
        p = self.copies[e]
        if seed is not None:
            p.env.set_seed(int(seed))
        p.env.reset()
        p.generate_map()
        for gi, h in enumerate(self.handles):
            ids = p.env.get_agent_id(h)
            self._base[e, gi] = int(ids.min()) if len(ids) else 0
            self._init_size[e, gi] = len(ids)
            cap = self.n if self.role_of(e, gi) == 0 else self.n_opp
            if len(ids) > cap or (len(ids) and int(ids.max() - ids.min()) + 1 != len(ids)):
                raise RuntimeError(f"magent2/{self.task}: team {gi} has {len(ids)} agents (ids not 0..{cap - 1})")
        self._t[e] = 0
        self._ret[e] = 0.0
        self._opp_ret[e] = 0.0
        self._first[e] = True

    def role_of(self, e: int, gi: int) -> int:
        return 0 if gi == int(self.side[e]) else 1

    def _alloc(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        E = self.num_envs
        roles = 2 if self.two_teams else 1
        obs = [np.zeros((E, self.role_size(r), self.role_obs_dim[r]), np.float32) for r in range(roles)]
        alive = [np.zeros((E, self.role_size(r)), bool) for r in range(roles)]
        return obs, alive

    def _arrays(self, obs: np.ndarray, alive: np.ndarray, first: np.ndarray) -> dict[str, np.ndarray]:
        # No copies: every step writes fresh arrays (_alloc), so published ones are never written again.
        return {"obs": obs, "state": self._state(), "active": alive, "first": first.copy()}

    def _batch(self, obs: np.ndarray, alive: np.ndarray, first: np.ndarray) -> BatchObs:
        return batch_obs(self._arrays(obs, alive, first), self.n_actions, self.device)

    def opponent_obs(self) -> BatchObs:
        """The opponent team's current observation (role 1), for opponent policies."""
        return self._batch(self._obs[1], self._alive[1], self._first)

    def opponent_arrays(self) -> dict[str, np.ndarray] | None:
        """:meth:`opponent_obs` as numpy arrays (None on one-team tasks)."""
        return self._arrays(self._obs[1], self._alive[1], self._first) if self.two_teams else None

    # ------------------------------------------------------------------ BatchedEnv
    def reset(self, seed: int | None = None) -> BatchObs:
        return batch_obs(self.reset_arrays(seed), self.n_actions, self.device)

    def reset_arrays(self, seed: int | None = None) -> dict[str, np.ndarray]:
        """:meth:`reset` as numpy arrays (what a subprocess worker sends)."""
        for e in range(self.num_envs):
            self._reset_copy(e, None if seed is None else seed + self.copy_offset + e)
        if seed is not None:
            self._rng = np.random.default_rng(seed)
            if self.opponent is not None:
                self.opponent.seed(seed)
        self._obs, self._alive = self._alloc()
        for e in range(self.num_envs):
            self._read(e, self._obs, self._alive, pre_clear=False)
        self._first[:] = True
        return self._arrays(self._obs[0], self._alive[0], self._first)

    def step(self, actions: torch.Tensor) -> BatchStep:
        if not self._obs:
            raise RuntimeError("MAgentEnv.step called before reset")
        a = check_actions(actions, self.task, self.num_envs, self.n, self.n_actions)
        opp = self.opponent.act(self) if self.opponent is not None else None
        return batch_step(self.step_arrays(a, opp), self.n_actions, self.device)

    def step_arrays(self, a: np.ndarray, opp: np.ndarray | None) -> dict[str, Any]:
        """One step of every copy with the learner's actions ``a`` and the opponent's ``opp`` (``[E, n_opp]``;
        None: the opponent stays at action 0), as numpy arrays: ``next``, ``final`` (observation dicts),
        ``reward``, ``terminated``, ``truncated``, ``episodes``, ``outcomes`` (of the episodes that ended),
        ``side`` and ``opponent_next`` (the opponent's next observation)."""
        if not self._obs:
            raise RuntimeError("MAgentEnv.step called before reset")
        E = self.num_envs
        n_out = len(self.outcomes)
        obs, alive = self._alloc()
        rew = np.zeros((E, self.n), np.float32)
        term = np.zeros(E, bool)
        trunc = np.zeros(E, bool)
        opp_rew = np.zeros(E, np.float64)
        episodes: list[EpisodeStats] = []
        for e in range(E):
            g = self.copies[e].env
            acts = [a[e], opp[e] if opp is not None else None]
            for role in range(2 if self.two_teams else 1):
                h = self.role_handle(e, role)
                ids = g.get_agent_id(h)
                if len(ids) == 0:
                    continue
                slots = ids - self._base[e, self.handles.index(h)]
                ra = acts[role]
                # Out-of-range actions corrupt the engine's memory: clip the opponent's (ours are checked).
                ra = np.clip(ra[slots], 0, (self.n_actions if role == 0 else self.n_actions_opp) - 1) \
                    if ra is not None else np.zeros(len(ids))
                g.set_action(h, np.ascontiguousarray(ra, np.int32))
            engine_done = g.step()
            for role in range(2 if self.two_teams else 1):
                h = self.role_handle(e, role)
                ids = g.get_agent_id(h)
                r = g.get_reward(h) if len(ids) else np.zeros(0, np.float32)
                if role == 0:
                    rew[e, ids - self._base[e, self.handles.index(h)]] = r
                else:
                    opp_rew[e] = float(r.sum())
            self._t[e] += 1
            self._read(e, obs, alive, pre_clear=True)
            g.clear_dead()
            wiped = not alive[0][e].any() or (self.two_teams and not alive[1][e].any())
            term[e] = bool(engine_done or wiped)
            trunc[e] = not term[e] and self._t[e] >= self.max_cycles
        self._ret += rew
        self._opp_ret += opp_rew
        final_alive = [x.copy() for x in alive]
        hp_final = self._hp.copy()
        t_final = self._t.copy()
        self._obs, self._alive = obs, alive
        self._first[:] = False
        final = self._arrays(obs[0], alive[0], self._first)
        ended = np.nonzero(term | trunc)[0]
        for e in ended.tolist():
            episodes.append(self._finish(e, final_alive, hp_final, int(t_final[e]), bool(trunc[e])))
        if len(ended):
            next_obs = [o.copy() for o in obs]
            next_alive = [x.copy() for x in alive]
            for e in ended.tolist():
                if self.swap:
                    self.side[e] = 1 - self.side[e]
                self._reset_copy(e, None)
                self._read(e, next_obs, next_alive, pre_clear=False)
            self._obs, self._alive = next_obs, next_alive
            nxt = self._arrays(next_obs[0], next_alive[0], self._first)
        else:
            nxt = final
        return {"next": nxt, "final": final, "reward": rew, "terminated": term, "truncated": trunc,
                "episodes": episodes, "outcomes": self.outcomes[n_out:], "side": self.side.copy(),
                "opponent_next": self.opponent_arrays()}

    def _finish(self, e: int, alive: list[np.ndarray], hp: np.ndarray, length: int, truncated: bool) -> EpisodeStats:
        n_l = int(self._init_size[e, int(self.side[e])])
        surv = (int(alive[0][e].sum()), int(alive[1][e].sum()) if self.two_teams else 0)
        n_o = int(self._init_size[e, 1 - int(self.side[e])]) if self.two_teams else 0
        out = {"learner_alive": float(surv[0]), "opponent_alive": float(surv[1]), "learner_size": float(n_l),
               "opponent_size": float(n_o), "kills": float(n_o - surv[1]), "deaths": float(n_l - surv[0]),
               "return": float(self._ret[e].sum()), "opponent_return": float(self._opp_ret[e]), "length": float(length),
               "side": float(self.side[e]), "win": winner(surv, (float(hp[e, 0]), float(hp[e, 1])))}
        self.outcomes.append(out)
        self._episodes_done += 1
        if self.opponent is not None:
            self.opponent.episode_finished(self)
        agent_returns = [float(x) for x in self._ret[e]]
        return EpisodeStats(team_return=float(sum(agent_returns)), agent_returns=agent_returns, length=length,
                            truncated=truncated)

    def attach_learner(self, algo: Any) -> None:
        """Give a self-play opponent the learner whose lagged copy it plays (called by the runner)."""
        if self.opponent is not None:
            self.opponent.attach(algo, self)

    def render(self, index: int = 0) -> np.ndarray | None:
        """A top-down frame: walls grey, the learner red, the opponent blue (4 px per cell)."""
        g = self.copies[index].env
        s = self.map_size
        img = np.full((s, s, 3), 255, np.uint8)
        walls = g._get_walls_info()
        if len(walls):
            w = np.asarray(walls)
            img[w[:, 1], w[:, 0]] = (120, 120, 120)
        colours = [(220, 40, 40), (40, 80, 220)]
        for role in range(2 if self.two_teams else 1):
            h = self.role_handle(index, role)
            if g.get_num(h):
                p = g.get_pos(h)
                img[p[:, 1].clip(0, s - 1), p[:, 0].clip(0, s - 1)] = colours[role]
        return np.kron(img, np.ones((4, 4, 1), np.uint8))

    def close(self) -> None:
        for p in self.copies:
            p.close()


def batch_obs(d: dict[str, np.ndarray], n_actions: int, device: torch.device | str = "cpu") -> BatchObs:
    """A :class:`BatchObs` from the arrays of :meth:`MAgentEnv.reset_arrays` (every action is allowed)."""
    alive = d["active"]
    return BatchObs(obs=torch.from_numpy(d["obs"]).to(device), state=torch.from_numpy(d["state"]).to(device),
                    action_mask=torch.ones(*alive.shape, n_actions, dtype=torch.bool, device=device),
                    active=torch.from_numpy(alive).to(device), first=torch.from_numpy(d["first"]).to(device))


def batch_step(d: dict[str, Any], n_actions: int, device: torch.device | str = "cpu") -> BatchStep:
    """A :class:`BatchStep` from the arrays of :meth:`MAgentEnv.step_arrays`."""
    return BatchStep(next=batch_obs(d["next"], n_actions, device), final=batch_obs(d["final"], n_actions, device),
                     reward=torch.from_numpy(d["reward"]).to(device), cost=None,
                     terminated=torch.from_numpy(d["terminated"]).to(device),
                     truncated=torch.from_numpy(d["truncated"]).to(device), episodes=d["episodes"])


def make_magent(task: str, num_envs: int = 1, seed: int | None = None, device: str = "cpu", workers: int = 0,
                **kw: Any) -> BatchedEnv:
    """``E`` copies in this process (``workers=0``) or spread over ``workers`` subprocesses
    (:class:`pamarl.envs.magent_workers.MAgentWorkers`, same results for a fixed seed)."""
    kw.pop("render_mode", None)
    if int(kw.get("copy_offset", 0)) != 0 or kw.get("opponent") == "external":
        raise UsageError(f"magent2/{task}: copy_offset and opponent=external are internal (subprocess workers)")
    if workers > 0:
        from pamarl.envs.magent_workers import MAgentWorkers

        return MAgentWorkers(task, num_envs=num_envs, workers=workers, seed=seed, device=device, **kw)
    return MAgentEnv(task, num_envs=num_envs, seed=seed, device=device, **kw)


register_family(
    EnvFamily(
        name="magent2",
        description="MAgent2 grid battles (many agents, two teams: the learner vs an opponent=random|script|"
                    "checkpoint:PATH|self), natively batched over the engine's per-team interface",
        tasks={k: v.description for k, v in TASKS.items()},
        make_batched=make_magent,
        extra="magent",
        batched_workers=True,
    )
)
