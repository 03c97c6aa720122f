"""Experiment metrics of the design document, as pure functions of logged evaluation data.

Length: about 700 lines of one concern, the experiment's metric definitions, each a short pure
function with its docstring and hand-checked conventions; a reader looks a metric up by name, and
splitting them would only scatter the shared conventions stated below.

Source: the "The paper's experiment" section of ``shared/specs/progressive.md`` (which restates
section 5.3 of the seed ``000_66b3dab9711f3679.txt``). Everything here is numpy only: no torch,
no I/O, no global state; randomness (bootstrap) comes from an explicitly seeded generator, so every
function is deterministic.

Per run (one training run, one seed), from the evaluation log
``steps[t]`` (env steps done when evaluation ``t`` ran) and ``returns[t]`` (mean evaluation
episode return at that point):

=====================================  =======================================================
``smooth``                             learning-curve smoothing (centered / trailing / EMA)
``final_return``                       mean of the last 10% of evaluation points
``constraint_satisfaction_rate``       share of evaluation episodes with cost <= cost_limit
``convergence``, ``convergence_step``  T_conv: first step the smoothed curve is 90% of the way
``learning_efficiency``                eta = (R_final - R_initial) / T_conv
``stability``                          sigma = std of evaluation returns (all, or last 10%)
``coordination``                       rho = mean pairwise Pearson correlation of log-probs
``run_metrics``                        all of the above in one ``dict[str, float]``
=====================================  =======================================================

Over seeds: ``mean_ci`` (Student-t interval), ``iqm`` (interquartile mean), ``bootstrap_ci``
(percentile bootstrap, stratified over tasks), ``iqm_ci``, ``aggregate`` and ``aggregate_runs``.

Conventions (where the spec is silent, these are the decisions):

* A NaN in a learning curve (``returns``, ``costs``, ``logps``) is a missing value: it is skipped,
  never propagated. ``+-inf`` is always an error. A metric that has no data left is NaN.
* "The last 10%" of training means the last ``max(1, ceil(0.1 * T))`` evaluation points; the
  runner evaluates at a fixed interval, so this is the last 10% of env steps.
* Smoothing (for T_conv) is a centered moving average over ``DEFAULT_WINDOW = 5`` evaluation
  points, truncated at the ends; R_initial / R_final of T_conv and eta are the first / last value
  of that smoothed curve (the mean of the first / last 3 points). ``final_return`` (the reported
  return) is the mean of the last 10% of points instead: a table column, not part of eta.
* Standard deviations follow the seed's formula sigma = sqrt(1/T sum (R_t - mean R)^2), i.e. the
  population std (``ddof=0``).
* The low-level aggregation functions reject NaN (drop failed runs explicitly);
  ``aggregate``/``aggregate_runs`` drop them for you and report how many values were used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from pamarl.errors import UsageError

__all__ = [
    "DEFAULT_WINDOW",
    "DEFAULT_THRESHOLD",
    "DEFAULT_LAST_FRAC",
    "Convergence",
    "smooth",
    "tail_count",
    "final_return",
    "constraint_satisfaction_rate",
    "convergence",
    "convergence_step",
    "learning_efficiency",
    "stability",
    "coordination",
    "run_metrics",
    "t_quantile",
    "mean_ci",
    "iqm",
    "bootstrap_ci",
    "iqm_ci",
    "aggregate",
    "aggregate_runs",
]

#: Default smoothing window, in evaluation points (centered moving average).
DEFAULT_WINDOW = 5
#: T_conv is the first step where the smoothed return is this fraction of the way to its final value.
DEFAULT_THRESHOLD = 0.9
#: "Last 10% of training": fraction of evaluation points used by final/last-window metrics.
DEFAULT_LAST_FRAC = 0.1

SmoothMethod = Literal["centered", "trailing", "ema"]
Statistic = Literal["mean", "median", "iqm"] | Callable[[NDArray[np.float64]], float]

# Relative tolerance for "reaches the target" and "the curve is flat" (absorbs float rounding of
# the moving average; far below any meaningful return difference).
_RTOL = 1e-9


# --------------------------------------------------------------------------- input validation


def _as_float_array(x: ArrayLike, name: str, *, ndim: int | tuple[int, ...] = 1) -> NDArray[np.float64]:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{name} must be numeric, got {type(x).__name__}: {exc}") from None
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if arr.ndim not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise UsageError(f"{name} must be {want}, got shape {arr.shape}")
    if arr.size == 0:
        raise UsageError(f"{name} is empty")
    if np.isinf(arr).any():
        raise UsageError(f"{name} contains inf")
    return arr


def _check_fraction(value: float, name: str, *, allow_zero: bool = False) -> float:
    value = float(value)
    ok = (0.0 <= value <= 1.0) if allow_zero else (0.0 < value <= 1.0)
    if not ok or math.isnan(value):
        rng = "[0, 1]" if allow_zero else "(0, 1]"
        raise UsageError(f"{name} must be in {rng}, got {value}")
    return value


def _check_confidence(confidence: float) -> float:
    confidence = float(confidence)
    if not 0.0 < confidence < 1.0:
        raise UsageError(f"confidence must be in (0, 1), got {confidence}")
    return confidence


def _check_steps(steps: ArrayLike, n: int) -> NDArray[np.float64]:
    s = _as_float_array(steps, "steps")
    if s.shape[0] != n:
        raise UsageError(f"steps and returns have different lengths ({s.shape[0]} vs {n})")
    if np.isnan(s).any():
        raise UsageError("steps contains NaN")
    if (s < 0).any():
        raise UsageError("steps must be >= 0 (env steps done)")
    if (np.diff(s) < 0).any():
        raise UsageError("steps must be non-decreasing (evaluation points in training order)")
    return s


def _check_no_nan(arr: NDArray[np.float64], name: str) -> None:
    if np.isnan(arr).any():
        raise UsageError(f"{name} contains NaN; drop the failed runs first (aggregate() does this)")


def _nanmean(x: NDArray[np.float64]) -> float:
    """Mean of the non-NaN entries; NaN (without a warning) when there are none."""
    finite = x[~np.isnan(x)]
    return float(finite.mean()) if finite.size else math.nan


# --------------------------------------------------------------------------- per-run metrics


def tail_count(n: int, frac: float = DEFAULT_LAST_FRAC) -> int:
    """Number of evaluation points in "the last ``frac`` of training": ``max(1, ceil(frac * n))``.

    >>> tail_count(100), tail_count(101), tail_count(5)
    (10, 11, 1)
    """
    if n < 1:
        raise UsageError(f"n must be >= 1, got {n}")
    frac = _check_fraction(frac, "frac")
    # the small offset keeps float noise (0.1 * 30 = 3.0000000000000004) from adding a point
    return max(1, min(n, math.ceil(frac * n - 1e-9)))


def smooth(
    values: ArrayLike, window: int = DEFAULT_WINDOW, method: SmoothMethod = "centered"
) -> NDArray[np.float64]:
    """Smooth a learning curve given at evaluation points; returns an array of the same length.

    ``window`` is counted in evaluation points; ``window=1`` returns the curve unchanged.

    * ``"centered"`` (default): centered moving average,
      ``s_t = mean(x_{t-h}, ..., x_{t+h})`` with ``h = (window - 1) // 2``; ``window`` must be odd.
      Near the ends the window is truncated to the points that exist (pandas'
      ``rolling(window, center=True, min_periods=1)``), so ``s_0`` is the mean of the first
      ``h + 1`` points and ``s_{T-1}`` the mean of the last ``h + 1``. No lag: a linear curve is
      reproduced exactly away from the ends.
    * ``"trailing"``: causal moving average ``s_t = mean(x_{t-window+1}, ..., x_t)`` (truncated
      at the start); lags a trend by ``(window - 1) / 2`` points.
    * ``"ema"``: exponential moving average with ``a = 2 / (window + 1)``,
      ``s_0 = x_0``, ``s_t = a x_t + (1 - a) s_{t-1}``.

    NaN entries are missing points: the averages skip them; an EMA carries its previous value over
    a NaN. A point whose whole window is NaN (or an EMA before the first finite value) stays NaN.
    The seed (section 5) does not say how to smooth; this is the library's choice.
    """
    x = _as_float_array(values, "values")
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise UsageError(f"window must be an integer >= 1, got {window!r}")
    window = int(window)
    n = x.shape[0]
    if method == "ema":
        a = 2.0 / (window + 1.0)
        out = np.full(n, np.nan)
        prev = math.nan
        for t in range(n):
            if not math.isnan(x[t]):
                prev = x[t] if math.isnan(prev) else a * x[t] + (1.0 - a) * prev
            out[t] = prev
        return out
    if method == "centered":
        if window % 2 == 0:
            raise UsageError(f"a centered moving average needs an odd window, got {window}")
        left = right = (window - 1) // 2
    elif method == "trailing":
        left, right = window - 1, 0
    else:
        raise UsageError(f"unknown smoothing method {method!r}; use 'centered', 'trailing' or 'ema'")
    valid = ~np.isnan(x)
    csum = np.concatenate([[0.0], np.cumsum(np.where(valid, x, 0.0))])
    ccnt = np.concatenate([[0], np.cumsum(valid)])
    idx = np.arange(n)
    lo = np.maximum(idx - left, 0)
    hi = np.minimum(idx + right + 1, n)
    cnt = ccnt[hi] - ccnt[lo]
    tot = csum[hi] - csum[lo]
    out = np.full(n, np.nan)
    np.divide(tot, cnt, out=out, where=cnt > 0)
    return out


def final_return(returns: ArrayLike, last_frac: float = DEFAULT_LAST_FRAC) -> float:
    """Final return: mean of the last ``tail_count(T, last_frac)`` evaluation returns.

    The "cumulative (episode) return" of the spec, as reported per run: the mean over the last 10%
    of evaluation points (default), skipping NaN; NaN when they are all NaN.
    """
    r = _as_float_array(returns, "returns")
    return _nanmean(r[-tail_count(r.shape[0], last_frac) :])


def constraint_satisfaction_rate(episode_costs: ArrayLike, cost_limit: float) -> float:
    """Share of evaluation episodes whose episode cost is ``<= cost_limit`` (spec, "Metrics").

    ``rate = #{e : C_e <= cost_limit} / #{e}``. ``episode_costs`` holds one cost per evaluation
    episode, in any shape (e.g. ``[evaluations, episodes]``); NaN entries (padding) are not
    episodes. NaN when no episode is left.
    """
    c = _as_float_array(episode_costs, "episode_costs", ndim=(0, 1, 2, 3)).ravel()
    limit = float(cost_limit)
    if not math.isfinite(limit):
        raise UsageError(f"cost_limit must be a finite number, got {cost_limit!r}")
    c = c[~np.isnan(c)]
    if c.size == 0:
        return math.nan
    return float(np.mean(c <= limit))


class Convergence(NamedTuple):
    """Result of :func:`convergence`.

    ``step`` is T_conv (env steps), ``index`` the evaluation point where it happens,
    ``r_initial`` / ``r_final`` the first / last finite values of the smoothed curve (the
    R_initial / R_final of the efficiency formula), ``target`` the level that had to be reached.
    """

    step: float
    # The field name shadows tuple.index on purpose (public, documented API); mypy flags any override.
    index: int  # type: ignore[assignment]
    r_initial: float
    r_final: float
    target: float


_NO_CONVERGENCE = Convergence(math.nan, -1, math.nan, math.nan, math.nan)


def convergence(
    steps: ArrayLike,
    returns: ArrayLike,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    window: int = DEFAULT_WINDOW,
    method: SmoothMethod = "centered",
) -> Convergence:
    """Convergence point of a learning curve (spec: "convergence speed T_conv").

    With ``s = smooth(returns, window, method)``, ``R_initial`` = first finite ``s``,
    ``R_final`` = last finite ``s`` and ``target = R_initial + threshold * (R_final - R_initial)``,
    T_conv is ``steps[t*]`` for the first evaluation point ``t*`` where the smoothed return has
    reached the target: ``s_t >= target`` for a rising curve (``R_final > R_initial``),
    ``s_t <= target`` for a falling one (so a curve that gets worse still gets a T_conv and a
    negative efficiency). No interpolation between evaluation points: T_conv is an evaluation
    step, measured from the start of training (``steps`` are absolute env-step counts).

    Special cases: a flat curve (``|R_final - R_initial| <= 1e-9 * max(1, |R_initial|,
    |R_final|)``) converged at once, T_conv = step of its first finite point; NaN points are
    skipped (see :func:`smooth`); a curve with no finite value gives all-NaN fields and
    ``index = -1``. Since the last finite point always reaches the target, T_conv exists otherwise.
    """
    r = _as_float_array(returns, "returns")
    s_arr = _check_steps(steps, r.shape[0])
    threshold = _check_fraction(threshold, "threshold")
    sm = smooth(r, window, method)
    finite = np.flatnonzero(~np.isnan(sm))
    if finite.size == 0:
        return _NO_CONVERGENCE
    r0, r1 = float(sm[finite[0]]), float(sm[finite[-1]])
    scale = max(1.0, abs(r0), abs(r1))
    if abs(r1 - r0) <= _RTOL * scale:
        i = int(finite[0])
        return Convergence(float(s_arr[i]), i, r0, r1, r0)
    target = r0 + threshold * (r1 - r0)
    tol = _RTOL * scale
    with np.errstate(invalid="ignore"):
        reached = sm >= target - tol if r1 > r0 else sm <= target + tol
    i = int(np.flatnonzero(reached & ~np.isnan(sm))[0])
    return Convergence(float(s_arr[i]), i, r0, r1, float(target))


def convergence_step(
    steps: ArrayLike,
    returns: ArrayLike,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    window: int = DEFAULT_WINDOW,
    method: SmoothMethod = "centered",
) -> float:
    """T_conv in env steps; see :func:`convergence` for the definition and the special cases."""
    return convergence(steps, returns, threshold=threshold, window=window, method=method).step


def learning_efficiency(
    steps: ArrayLike,
    returns: ArrayLike,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    window: int = DEFAULT_WINDOW,
    method: SmoothMethod = "centered",
) -> float:
    """Learning efficiency (seed 5.3.1): ``eta = (R_final - R_initial) / T_conv``.

    ``R_initial``, ``R_final`` and ``T_conv`` are those of :func:`convergence` (the smoothed
    curve's first and last values, and the convergence step), so the three are consistent. Units:
    return per env step. A flat curve has ``eta = 0`` (even if T_conv is 0); NaN when the curve has
    no finite value. ``eta < 0`` for a curve that got worse.
    """
    c = convergence(steps, returns, threshold=threshold, window=window, method=method)
    if math.isnan(c.step):
        return math.nan
    diff = c.r_final - c.r_initial
    if diff == 0.0 or abs(diff) <= _RTOL * max(1.0, abs(c.r_initial), abs(c.r_final)):
        return 0.0
    if c.step == 0.0:  # unreachable for a non-flat curve (its first point never reaches the target)
        return math.nan
    return diff / c.step


def stability(returns: ArrayLike, last_frac: float = 1.0) -> float:
    """Stability (seed 5.3.2): ``sigma = sqrt(1/T * sum_t (R_t - mean R)^2)``.

    Population standard deviation (``ddof=0``, the seed's 1/T) of the evaluation returns over
    training (``last_frac=1``, the seed's definition) or over the last ``tail_count(T, last_frac)``
    evaluation points (``last_frac=0.1``: "the last 10% of training", spec). Lower is more
    stable. NaN points are skipped; NaN if none is left; 0 for a single point.
    """
    r = _as_float_array(returns, "returns")
    tail = r[-tail_count(r.shape[0], last_frac) :]
    tail = tail[~np.isnan(tail)]
    return float(np.std(tail)) if tail.size else math.nan


def _is_constant(x: NDArray[np.float64]) -> bool:
    return float(np.ptp(x)) <= 1e-12 * max(1.0, float(np.max(np.abs(x))))


def coordination(logps: ArrayLike) -> float:
    """Coordination (seed 5.3.3): ``rho = 1/(N(N-1)) * sum_{i != j} corr(pi_i, pi_j)``.

    ``logps[t, i]`` is agent i's log-probability of the action it took at evaluation time step t
    (concatenate the steps of several evaluation episodes along axis 0). ``corr`` is the Pearson
    correlation over time steps. Pearson's r is symmetric, so the mean over ordered pairs equals
    the mean over unordered pairs.

    Choices where the seed is silent: each pair uses the time steps where both columns are
    non-NaN (pairwise-complete; an agent that is dead at some steps can log NaN there); a pair is
    left out when, on those steps, either column is constant (zero variance: Pearson's r is
    undefined, e.g. a deterministic agent whose log-prob is always 0) or fewer than 2 steps
    remain; rho is the mean over the remaining pairs, NaN when no pair remains. Needs N >= 2.
    """
    lp = _as_float_array(logps, "logps", ndim=2)
    _, n_agents = lp.shape
    if n_agents < 2:
        raise UsageError(f"coordination needs at least 2 agents (columns), got logps of shape {lp.shape}")
    corrs: list[float] = []
    for i in range(n_agents):
        for j in range(i + 1, n_agents):
            both = ~np.isnan(lp[:, i]) & ~np.isnan(lp[:, j])
            if both.sum() < 2:
                continue
            a, b = lp[both, i], lp[both, j]
            if _is_constant(a) or _is_constant(b):
                continue
            a = a - a.mean()
            b = b - b.mean()
            r = float(np.dot(a, b) / math.sqrt(float(np.dot(a, a)) * float(np.dot(b, b))))
            corrs.append(min(1.0, max(-1.0, r)))
    return float(np.mean(corrs)) if corrs else math.nan


def run_metrics(
    steps: ArrayLike,
    returns: ArrayLike,
    costs: ArrayLike | None = None,
    cost_limit: float | None = None,
    logps: ArrayLike | None = None,
    *,
    window: int = DEFAULT_WINDOW,
    threshold: float = DEFAULT_THRESHOLD,
    last_frac: float = DEFAULT_LAST_FRAC,
) -> dict[str, float]:
    """All per-run metrics of the spec from one run's evaluation log.

    Inputs: ``steps [T]`` env steps at each evaluation; ``returns [T]`` (mean evaluation return)
    or ``[T, E]`` (one return per evaluation episode; averaged over episodes, NaN = padding);
    ``costs`` likewise ``[T]`` or ``[T, E]`` episode costs (with ``[T]`` each evaluation point
    counts as one episode in the satisfaction rate); ``cost_limit``; ``logps [S, N]`` per-step
    log-probabilities of the taken actions, see :func:`coordination`.

    Returns a dict with always the same keys (NaN where the inputs for a metric are missing):

    * ``final_return``: :func:`final_return` (last ``last_frac`` of evaluation points);
    * ``r_initial``, ``r_final``, ``t_conv``: :func:`convergence` with ``window``/``threshold``;
    * ``eta``: :func:`learning_efficiency`, equal to ``(r_final - r_initial) / t_conv``;
    * ``sigma``, ``sigma_last``: :func:`stability` over all points / the last ``last_frac``;
    * ``final_cost``: mean episode cost over the last ``last_frac`` of evaluation points;
    * ``constraint_satisfaction``, ``constraint_satisfaction_last``:
      :func:`constraint_satisfaction_rate` over all evaluation episodes / those of the last
      ``last_frac`` of evaluation points (need ``costs`` and ``cost_limit``);
    * ``rho``: :func:`coordination` (needs ``logps``).
    """
    r2 = _as_float_array(returns, "returns", ndim=(1, 2))
    n = r2.shape[0]
    if r2.ndim == 2:
        if r2.shape[1] == 0:
            raise UsageError("returns has no evaluation episodes (shape [T, 0])")
        r = np.array([_nanmean(row) for row in r2])
    else:
        r = r2
    s = _check_steps(steps, n)
    k = tail_count(n, last_frac)
    conv = convergence(s, r, threshold=threshold, window=window)
    out: dict[str, float] = {
        "final_return": final_return(r, last_frac),
        "r_initial": conv.r_initial,
        "r_final": conv.r_final,
        "t_conv": conv.step,
        "eta": learning_efficiency(s, r, threshold=threshold, window=window),
        "sigma": stability(r, 1.0),
        "sigma_last": stability(r, last_frac),
        "final_cost": math.nan,
        "constraint_satisfaction": math.nan,
        "constraint_satisfaction_last": math.nan,
        "rho": math.nan,
    }
    if costs is not None:
        c = _as_float_array(costs, "costs", ndim=(1, 2))
        if c.shape[0] != n:
            raise UsageError(f"costs and returns have different lengths ({c.shape[0]} vs {n})")
        if c.ndim == 2 and c.shape[1] == 0:
            raise UsageError("costs has no evaluation episodes (shape [T, 0])")
        c_mean = c if c.ndim == 1 else np.array([_nanmean(row) for row in c])
        out["final_cost"] = _nanmean(c_mean[-k:])
        if cost_limit is not None:
            out["constraint_satisfaction"] = constraint_satisfaction_rate(c, cost_limit)
            out["constraint_satisfaction_last"] = constraint_satisfaction_rate(c[-k:], cost_limit)
    elif cost_limit is not None and not math.isfinite(float(cost_limit)):
        raise UsageError(f"cost_limit must be a finite number, got {cost_limit!r}")
    if logps is not None:
        out["rho"] = coordination(logps)
    return out


# --------------------------------------------------------------------------- aggregation over seeds


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def _t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t distribution with ``df`` degrees of freedom (numpy-free, exact to
    ~1e-10: bisection on the CDF, which is computed from the regularized incomplete beta).

    >>> round(t_quantile(0.975, 4), 4)
    2.7764
    """
    p, df = float(p), float(df)
    if not 0.0 < p < 1.0:
        raise UsageError(f"p must be in (0, 1), got {p}")
    if not df > 0.0 or math.isinf(df):
        raise UsageError(f"df must be a finite number > 0, got {df}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def mean_ci(values: ArrayLike, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean over runs with a Student-t confidence interval: ``(mean, low, high)``.

    ``mean +- t_{(1+confidence)/2, n-1} * s / sqrt(n)`` with ``s`` the sample std (``ddof=1``).
    With a single value the interval is undefined: ``(x, nan, nan)``. Values must not be NaN.
    """
    x = _as_float_array(values, "values").ravel()
    _check_no_nan(x, "values")
    confidence = _check_confidence(confidence)
    n = x.size
    m = float(x.mean())
    if n < 2:
        return m, math.nan, math.nan
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    return m, m - half, m + half


def _iqm_sorted_rows(sorted_rows: NDArray[np.float64]) -> NDArray[np.float64]:
    n = sorted_rows.shape[-1]
    cut = int(0.25 * n)
    return sorted_rows[..., cut : n - cut].mean(axis=-1)


def iqm(values: ArrayLike) -> float:
    """Interquartile mean: the mean of the middle 50% of all values (Agarwal et al. 2021).

    As in ``rliable`` (``scipy.stats.trim_mean(x, 0.25)``): sort the ``n`` values, drop
    ``floor(n / 4)`` from each end, average the rest; so for ``n < 4`` it is the plain mean.
    ``values`` may be ``[runs]`` or ``[runs, tasks]`` (all entries pooled). Values must not be NaN.
    """
    x = _as_float_array(values, "values", ndim=(1, 2)).ravel()
    _check_no_nan(x, "values")
    return float(_iqm_sorted_rows(np.sort(x)))


def _resolve_statistic(statistic: Statistic) -> Callable[[NDArray[np.float64]], NDArray[np.float64]]:
    """A function mapping a [B, n] array of resamples to B statistics."""
    if statistic == "mean":
        return lambda a: a.mean(axis=1)
    if statistic == "median":
        return lambda a: np.median(a, axis=1)
    if statistic == "iqm":
        return lambda a: _iqm_sorted_rows(np.sort(a, axis=1))
    if callable(statistic):
        fn = statistic
        return lambda a: np.array([float(fn(row)) for row in a])
    raise UsageError(f"unknown statistic {statistic!r}; use 'mean', 'median', 'iqm' or a callable")


def bootstrap_ci(
    values: ArrayLike,
    statistic: Statistic = "mean",
    *,
    confidence: float = 0.95,
    n_boot: int = 10_000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Percentile-bootstrap confidence interval of a statistic over runs: ``(point, low, high)``.

    ``values`` is ``[runs]`` or ``[runs, tasks]``. Each of ``n_boot`` resamples draws ``runs``
    run indices with replacement, independently per task column (stratified bootstrap, as in
    ``rliable``), and evaluates ``statistic`` on all resampled entries pooled. ``low``/``high`` are
    the ``(1 -+ confidence) / 2`` quantiles of the resampled statistics; ``point`` is the
    statistic on the data. ``statistic``: ``"mean"``, ``"median"``, ``"iqm"`` or a callable taking
    a 1-D array. The generator is ``numpy.random.default_rng(seed)``: same inputs and seed, same
    interval. Values must not be NaN.
    """
    x = _as_float_array(values, "values", ndim=(1, 2))
    _check_no_nan(x, "values")
    confidence = _check_confidence(confidence)
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise UsageError(f"n_boot must be an integer >= 1, got {n_boot!r}")
    stat = _resolve_statistic(statistic)
    x2 = x.reshape(x.shape[0], -1)  # [runs, tasks]
    n_runs, n_tasks = x2.shape
    point = float(stat(x2.reshape(1, -1))[0])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_runs, size=(int(n_boot), n_runs, n_tasks))
    resampled = np.take_along_axis(x2[None, :, :], idx, axis=1).reshape(int(n_boot), -1)
    boots = stat(resampled)
    low, high = np.quantile(boots, [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0])
    return point, float(low), float(high)


def iqm_ci(
    values: ArrayLike, *, confidence: float = 0.95, n_boot: int = 10_000, seed: int = 0
) -> tuple[float, float, float]:
    """Interquartile mean with a stratified percentile-bootstrap interval: ``(iqm, low, high)``.

    Shorthand for ``bootstrap_ci(values, "iqm", ...)``; see :func:`iqm` and :func:`bootstrap_ci`.
    """
    return bootstrap_ci(values, "iqm", confidence=confidence, n_boot=n_boot, seed=seed)


def aggregate(
    values: ArrayLike, *, confidence: float = 0.95, n_boot: int = 10_000, seed: int = 0
) -> dict[str, float]:
    """Summary of one metric over seeds (the spec's "mean and spread over seeds").

    NaN values (runs where the metric is undefined) are dropped first. Returns
    ``n`` (values used), ``mean``, ``std`` (sample std, ``ddof=1``; NaN for n < 2),
    ``ci_low``/``ci_high`` (Student-t interval of the mean, :func:`mean_ci`), ``iqm`` and
    ``iqm_low``/``iqm_high`` (bootstrap interval, :func:`iqm_ci`). All NaN (and ``n = 0``) when no
    value is left.
    """
    x = _as_float_array(values, "values").ravel()
    x = x[~np.isnan(x)]
    keys = ("mean", "std", "ci_low", "ci_high", "iqm", "iqm_low", "iqm_high")
    if x.size == 0:
        return {"n": 0.0, **dict.fromkeys(keys, math.nan)}
    mean, lo, hi = mean_ci(x, confidence)
    q, q_lo, q_hi = iqm_ci(x, confidence=confidence, n_boot=n_boot, seed=seed)
    std = float(x.std(ddof=1)) if x.size > 1 else math.nan
    return {
        "n": float(x.size),
        "mean": mean,
        "std": std,
        "ci_low": lo,
        "ci_high": hi,
        "iqm": q,
        "iqm_low": q_lo,
        "iqm_high": q_hi,
    }


def aggregate_runs(
    runs: Sequence[Mapping[str, float]],
    *,
    confidence: float = 0.95,
    n_boot: int = 10_000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """:func:`aggregate` applied to every metric of a list of per-seed :func:`run_metrics` dicts.

    Returns ``{metric: aggregate(...)}`` for every key present in at least one run (a run missing
    a key counts as NaN for it, i.e. is dropped for that metric). Keys keep first-seen order.
    """
    if len(runs) == 0:
        raise UsageError("runs is empty")
    keys: list[str] = []
    for run in runs:
        keys.extend(k for k in run if k not in keys)
    return {
        k: aggregate(
            [float(run.get(k, math.nan)) for run in runs], confidence=confidence, n_boot=n_boot, seed=seed
        )
        for k in keys
    }
