"""One table of what every config key and env parameter may be: type, range, and whether a resume may change it.

:func:`pamarl.config.build` looks every field of a run or algorithm config up here by name (a field's
``dataclasses.field(metadata={"rule": Rule(...)})`` wins over the table), and :func:`pamarl.envs.registry.resolve`
checks env query parameters against their family's ``params`` table the same way. A value outside
its range is a :class:`~pamarl.errors.UsageError` naming the key, the range and the value.

``Rule.resume`` says whether ``pamarl train --resume RUN key=value`` may change the key: ``True``
(learning rates, clipping, entropy, evaluation and logging settings, the step budget: what a user
changes after a failure), or a string giving the reason it may not (the checkpoint would be
meaningless: network sizes, env, algorithm). Keys not in the table may not change on resume.

Torch-free: env workers import the registry, which imports this.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from pamarl.errors import UsageError

_NETS = "the networks in the checkpoint were built with the old value"


def _num(x: float | None) -> str:
    return str(int(x)) if x is not None and float(x).is_integer() else f"{x:g}"


def strict_bool(value: Any) -> bool | None:
    """YAML's true/false (and yes/no, 1/0 from the command line) as a bool; None for anything else
    ('maybe' is an error for the caller to report)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    return None


@dataclass(frozen=True)
class Rule:
    """What one value may be. Bounds apply to numbers (to each element of a sequence)."""

    kind: type | None = None
    """bool, int, float or str to check and coerce the type (None: only the bounds)."""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] | None = None
    optional: bool = False
    """None is allowed."""
    empty: bool = False
    """An empty sequence is allowed."""
    resume: bool | str = False
    """True: a resume may change it; a string: why it may not."""

    def describe(self) -> str:
        parts = []
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        lo = f"> {_num(self.gt)}" if self.gt is not None else f">= {_num(self.ge)}" if self.ge is not None else ""
        hi = f"< {_num(self.lt)}" if self.lt is not None else f"<= {_num(self.le)}" if self.le is not None else ""
        if self.kind is not None:
            parts.append({bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
                self.kind, self.kind.__name__))
        parts.extend(p for p in (lo, hi) if p)
        return " ".join(parts[:1]) + (" " + " and ".join(parts[1:]) if len(parts) > 1 else "")

    def check(self, key: str, value: Any, where: str = "config key") -> Any:
        """``value`` coerced to ``kind`` if it fits, else :class:`UsageError` naming ``key``."""
        if value is None:
            if self.optional:
                return None
            raise UsageError(f"{where} {key!r} must be set ({self.describe()}), got nothing")
        if isinstance(value, list | tuple):
            if not self.empty and len(value) == 0:
                raise UsageError(f"{where} {key!r} needs at least one value ({self.describe()})")
            return type(value)(self.check(key, v, where) for v in value)
        v = self._coerce(key, value, where)
        bad = (
            (self.choices is not None and v not in self.choices)
            or (isinstance(v, float) and not math.isfinite(v))
            or (self.ge is not None and v < self.ge)
            or (self.gt is not None and v <= self.gt)
            or (self.le is not None and v > self.le)
            or (self.lt is not None and v >= self.lt)
        )
        if bad:
            raise UsageError(f"{where} {key!r} must be {self.describe()}, got {value!r}")
        return v

    def _coerce(self, key: str, value: Any, where: str) -> Any:
        if self.kind is None:
            return value
        if self.kind is bool:
            b = strict_bool(value)
            if b is not None:
                return b
        elif self.kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
        elif self.kind is float:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        elif self.kind is str:
            if isinstance(value, str):
                return value
        else:
            return value
        raise UsageError(f"{where} {key!r} must be {self.describe()}, got {value!r}")


def positive(kind: type = int, resume: bool | str = False) -> Rule:
    return Rule(kind, gt=0, resume=resume) if kind is float else Rule(kind, ge=1, resume=resume)


def nonneg(kind: type = int, resume: bool | str = False) -> Rule:
    return Rule(kind, ge=0, resume=resume)


def prob(resume: bool | str = False) -> Rule:
    return Rule(float, ge=0.0, le=1.0, resume=resume)


RULES: dict[str, Rule] = {
    # ---- run (TrainConfig)
    "algo": Rule(str, resume="the checkpoint holds another algorithm's networks; start a new run"),
    "env": Rule(str, resume="the networks' input and output sizes come from the env; start a new run"),
    "steps": positive(int, resume=True),
    "seed": Rule(int, ge=0, le=2**31 - 1, resume="the seed identifies the run; start a new run for another seed"),
    "num_envs": positive(int, resume="the env-reset schedule and the rollout buffers are sized by it"),
    "rollout_len": positive(int, resume="iterations (and the env steps counted so far) are defined by it"),
    "env_workers": nonneg(int, resume=True),
    "env_inline": Rule(bool, resume=True),
    "eval_every": nonneg(int, resume=True),
    "eval_episodes": positive(int, resume=True),
    "eval_deterministic": Rule(bool, resume=True),
    "checkpoint_every": nonneg(int, resume=True),
    "checkpoint_minutes": Rule(float, ge=0.0, resume=True),
    "keep_checkpoints": Rule(bool, resume=True),
    "cost_limit": Rule(float, ge=0.0, optional=True, resume=True),
    "torch_threads": positive(int, resume=True),
    "device": Rule(str, resume=True),
    "tensorboard": Rule(bool, resume=True),
    "progress": Rule(bool, resume=True),
    "run_dir": Rule(str, optional=True, resume=True),
    "env_backend": Rule(str, choices=("local", "ray"), resume=True),
    "rollout_workers": nonneg(int, resume=True),  # any W continues correctly (another W samples other streams)
    "reward": Rule(str, choices=("auto", "team", "individual"),
                   resume="the value functions learnt so far estimate the old reward"),
    # ---- learners (LearnerConfig and subclasses)
    "lr": positive(float, resume=True),
    "critic_lr": positive(float, resume=True),
    "adam_eps": positive(float, resume=True),
    "gamma": Rule(float, gt=0.0, le=1.0, resume="the value function learnt so far estimates the old discount"),
    "max_grad_norm": nonneg(float, resume=True),  # 0: no clipping
    "hidden": positive(int, resume=_NETS),
    "critic_hidden": positive(int, resume=_NETS),
    "activation": Rule(str, choices=("relu", "tanh", "elu"), resume=_NETS),
    "share_params": Rule(bool, resume=_NETS + " (one shared network or one per agent)"),
    "agent_id": Rule(bool, resume=_NETS + " (the agent id is part of their input)"),
    # on-policy
    "gae_lambda": prob(resume=True),
    "epochs": positive(int, resume=True),
    "critic_epochs": nonneg(int, resume=True),
    "minibatches": positive(int, resume=True),
    "clip": Rule(float, gt=0.0, lt=1.0, resume=True),
    "entropy_coef": nonneg(float, resume=True),
    "value_clip": nonneg(float, resume=True),
    "huber_delta": nonneg(float, resume=True),
    "value_norm": Rule(bool, resume="the value normaliser's statistics are part of the checkpoint"),
    "adv_norm": Rule(bool, resume=True),
    "critic_input": Rule(str, choices=("state", "obs", "state+obs"), resume=_NETS + " (the critic's input)"),
    "lr_anneal": Rule(bool, resume=True),
    "critic": Rule(str, choices=("auto", "per_agent", "shared"), resume=_NETS + " (one team critic or one per agent)"),
    "input_norm": Rule(bool, resume=_NETS + " (LayerNorm on their inputs)"),
    "log_std_init": Rule(float, resume="the policies' log std is a trained parameter in the checkpoint"),
    "state_dependent_std": Rule(bool, resume=_NETS),
    "squash": Rule(str, resume="the policies were trained with the old action squashing"),
    "uses_cost": Rule(bool, resume="the cost critic exists only in runs that started with it"),
    # progressive
    "alpha_init": prob(resume="the critical-agent schedule of the run so far used the old value"),
    "alpha_final": prob(resume="the critical-agent schedule of the run so far used the old value"),
    "w_value": nonneg(float, resume=True),
    "w_policy": nonneg(float, resume=True),
    "w_cost": nonneg(float, resume=True),
    "importance_eps": positive(float, resume=True),
    "lambda_init": nonneg(float, resume="the Lagrange multiplier is in the checkpoint; change lambda_lr instead"),
    "lambda_lr": nonneg(float, resume=True),
    # HATRPO
    "kl_threshold": positive(float, resume=True),
    "cg_iters": positive(int, resume=True),
    "cg_residual_tol": positive(float, resume=True),
    "damping": nonneg(float, resume=True),
    "ls_steps": positive(int, resume=True),
    "accept_ratio": nonneg(float, resume=True),
    "backtrack_coeff": Rule(float, gt=0.0, lt=1.0, resume=True),
    # off-policy
    "n_step": positive(int, resume="the replay buffer stores n-step returns of the old n"),
    "batch_size": positive(int, resume=True),
    "buffer_size": positive(int, resume="the replay buffer in the checkpoint has the old capacity"),
    "learning_starts": nonneg(int, resume=True),
    "env_steps_per_update": positive(float, resume=True),
    "updates_per_iteration": nonneg(int, resume=True),
    "tau": Rule(float, gt=0.0, le=1.0, resume=True),
    "target_update_interval": nonneg(int, resume=True),
    "team_reward": Rule(str, resume="the replay buffer stores rewards combined the old way"),
    "checkpoint_replay": Rule(bool, resume=True),
    "eps_start": prob(resume=True),
    "eps_finish": prob(resume=True),
    "eps_anneal_steps": nonneg(int, resume=True),
    "double_q": Rule(bool, resume=True),
    "rnn": Rule(bool, resume=_NETS),
    "rnn_hidden": positive(int, resume=_NETS),
    "episode_batch": positive(int, resume=True),
    "max_seq_len": positive(int, resume=True),
    "expl_noise": nonneg(float, resume=True),
    "random_warmup": Rule(bool, resume=True),
    "sync_every_step": Rule(bool, resume=True),
    "policy_noise": nonneg(float, resume=True),
    "noise_clip": nonneg(float, resume=True),
    "policy_delay": positive(int, resume=True),
    "gumbel_tau": positive(float, resume=True),
    "actor_reg": nonneg(float, resume=True),
    "share_critic": Rule(bool, resume=_NETS),
    "mixing_embed": positive(int, resume=_NETS),
    "hypernet_layers": Rule(int, choices=(1, 2), resume=_NETS),
    "hypernet_embed": positive(int, resume=_NETS),
    "layer_norm": Rule(bool, resume=_NETS + " (LayerNorm after each hidden layer)"),
    # mean-field (MF-Q, MF-AC)
    "agent_steps_per_update": positive(float, resume=True),
    "temp_start": positive(float, resume=True),
    "temp_finish": positive(float, resume=True),
    "temp_anneal_steps": nonneg(int, resume=True),
    "neighbourhood": Rule(str, choices=("team", "radius"), resume=True),
    "radius": nonneg(int, resume=True),
    "conv_channels": Rule(int, ge=1, empty=True, resume=_NETS),
    "embed": positive(int, resume=_NETS),
    "mean_embed": positive(int, resume=_NETS),
    "obs_fp16": Rule(bool, resume="the replay in the checkpoint stores observations at the old precision"),
    "chunk": positive(int, resume=True),
    "value_coef": nonneg(float, resume=True),
    "ent_coef": nonneg(float, resume=True),
    "critic_replay": nonneg(int, resume=True),
    "critic_updates": nonneg(int, resume=True),
    "critic_batch": positive(int, resume=True),
    "actor_grad": Rule(str, choices=("sampled", "all_actions"), resume=True),
    "actor_replay": Rule(bool, resume=True),
    # DQN with parameter averaging
    "n_learners": positive(int, resume="each learner's networks, optimiser and replay are in the checkpoint"),
    "sync_every": positive(int, resume=True),
    "sync_mode": Rule(str, choices=("sync", "async"), resume=True),
    "max_staleness": positive(int, resume=True),
    "opt_state": Rule(str, choices=("average", "reset"), resume=True),
    "learner_eps": Rule(float, ge=0.0, le=1.0, empty=True, resume=True),
    "backend": Rule(str, choices=("local", "ray", "auto"), resume=True),
    "ray_address": Rule(str, resume=True),
    "cpus_per_learner": positive(float, resume=True),
    "max_restarts": nonneg(int, resume=True),
}
"""Every config key by name. A new config field needs a line here (``tests/test_bad_inputs.py`` checks)."""


def rule_for(cls: type, name: str) -> Rule | None:
    """The rule of field ``name`` of dataclass ``cls``: its ``metadata["rule"]``, else the table's."""
    for f in dataclasses.fields(cls):
        if f.name == name and "rule" in f.metadata:
            return f.metadata["rule"]  # type: ignore[no-any-return]
    return RULES.get(name)


def check_config(obj: Any, what: str) -> None:
    """Check every field of config dataclass ``obj`` against its rule, in place (coerced values kept)."""
    for f in dataclasses.fields(obj):
        rule = rule_for(type(obj), f.name)
        v = getattr(obj, f.name)
        if rule is None:
            if isinstance(v, float) and not math.isfinite(v):
                raise UsageError(f"{what} config key {f.name!r} must be a finite number, got {v!r}")
            continue
        object.__setattr__(obj, f.name, rule.check(f.name, v, f"{what} config key"))


def check_params(params: dict[str, Any], rules: dict[str, Rule], env: str) -> dict[str, Any]:
    """Env query parameters checked against a family's rules (parameters without a rule pass as they are)."""
    out = dict(params)
    for k, v in params.items():
        r = rules.get(k)
        if r is not None:
            out[k] = r.check(k, v, f"env {env}: parameter")
        elif isinstance(v, float) and not math.isfinite(v):
            raise UsageError(f"env {env}: parameter {k!r} must be a finite number, got {v!r}")
    return out


def resume_changes(old: dict[str, Any], new: dict[str, Any], cls: type | None = None) -> dict[str, tuple[Any, Any]]:
    """``{key: (old, new)}`` of the keys that differ; :class:`UsageError` for one a resume may not change."""
    changes: dict[str, tuple[Any, Any]] = {}
    for k in new:
        a, b = old.get(k), new[k]
        a = list(a) if isinstance(a, tuple) else a
        b = list(b) if isinstance(b, tuple) else b
        if k == "run_dir" or a == b:
            continue
        rule = rule_for(cls, k) if cls is not None else RULES.get(k)
        why = rule.resume if rule is not None else "it is not known to be safe to change mid-run"
        if why is not True:
            names = [f.name for f in dataclasses.fields(cls)] if cls is not None else list(RULES)
            ok = sorted(n for n in names if n != "run_dir" and getattr(rule_for(cls, n) if cls else RULES.get(n),
                                                                        "resume", False) is True)
            raise UsageError(f"--resume cannot change {k!r} ({a!r} -> {b!r}): {why}. Keys of this kind a resume may "
                             f"change: {', '.join(ok)}")
        changes[k] = (a, b)
    return changes


def check_together(run: Any, algo_cfg: Any) -> None:
    """Constraints between keys (each key's own range is in :data:`RULES`)."""
    batch = run.num_envs * run.rollout_len
    mb = getattr(algo_cfg, "minibatches", None)
    if mb is not None and mb > batch:
        raise UsageError(f"minibatches={mb} is more than the {batch} samples of an iteration (num_envs x "
                         f"rollout_len = {run.num_envs} x {run.rollout_len}); use at most {batch}")
    if run.rollout_workers > 0:
        check_rollout_workers(run)
    if run.env_inline and (run.env_workers < 1 or run.env_backend != "local"):
        raise UsageError(f"env_inline=true shares the env copies between this process and its local env workers, but "
                         f"env_workers={run.env_workers} env_backend={run.env_backend}: set env_workers>=1 "
                         "env_backend=local, or env_inline=false")
    bs, cap = getattr(algo_cfg, "batch_size", None), getattr(algo_cfg, "buffer_size", None)
    if bs is not None and cap is not None and bs > cap:
        raise UsageError(f"batch_size={bs} exceeds buffer_size={cap}: the replay can never fill one batch")


def check_rollout_workers(run: Any) -> None:
    """``rollout_workers=W``: an on-policy algorithm, at most ``num_envs`` workers, no ``env_workers`` besides."""
    from pamarl.algos.onpolicy import OnPolicyAlgorithm  # lazy: this module stays torch-free on import
    from pamarl.algos.registry import algorithms, get_algorithm

    W, E = run.rollout_workers, run.num_envs
    if not issubclass(get_algorithm(run.algo), OnPolicyAlgorithm):
        family = sorted(n for n, c in algorithms().items() if issubclass(c, OnPolicyAlgorithm))
        raise UsageError(f"rollout_workers={W} is for the on-policy family ({', '.join(family)}), not {run.algo!r}: "
                         "set rollout_workers=0 (env_workers=W env_backend=ray steps its env copies on Ray actors)")
    if W > E:
        raise UsageError(f"rollout_workers={W} is more than num_envs={E}: every worker needs at least one env copy; "
                         f"use rollout_workers<={E} or raise num_envs")
    if run.env_workers > 0:
        raise UsageError(f"rollout_workers={W} and env_workers={run.env_workers} together: rollout workers step "
                         "their own env copies; set env_workers=0")
