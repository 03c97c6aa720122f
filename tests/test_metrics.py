"""Tests of pamarl.metrics on synthetic curves with known answers."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from pamarl import metrics as M

STEPS = np.arange(0, 1001, 10, dtype=float)  # 101 evaluation points, 0..1000 env steps
RAMP = STEPS / 10.0  # 0 .. 100


# --------------------------------------------------------------------------- module hygiene


def test_module_imports_no_torch():
    code = "import sys, pamarl.metrics; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_errors_are_value_errors():
    with pytest.raises(ValueError, match="empty"):
        M.final_return([])


# --------------------------------------------------------------------------- smoothing


def test_smooth_window_one_is_identity():
    x = np.array([3.0, -1.0, 7.0, 2.0])
    for method in ("centered", "trailing", "ema"):
        np.testing.assert_allclose(M.smooth(x, 1, method), x)


def test_smooth_centered_known_values_and_truncated_edges():
    x = np.array([0.0, 1.0, 2.0, 3.0, 10.0])
    np.testing.assert_allclose(M.smooth(x, 3), [0.5, 1.0, 2.0, 5.0, 6.5])
    # a linear ramp is reproduced exactly away from the ends
    s = M.smooth(RAMP, 5)
    np.testing.assert_allclose(s[2:-2], RAMP[2:-2])
    assert s[0] == pytest.approx(1.0) and s[-1] == pytest.approx(99.0)


def test_smooth_trailing_and_ema():
    x = np.array([0.0, 3.0, 6.0, 9.0])
    np.testing.assert_allclose(M.smooth(x, 3, "trailing"), [0.0, 1.5, 3.0, 6.0])
    a = 2.0 / 4.0
    ema = [0.0]
    for v in x[1:]:
        ema.append(a * v + (1 - a) * ema[-1])
    np.testing.assert_allclose(M.smooth(x, 3, "ema"), ema)


def test_smooth_skips_nan():
    x = np.array([np.nan, 2.0, np.nan, 4.0, np.nan, np.nan, np.nan])
    np.testing.assert_allclose(M.smooth(x, 3)[:5], [2.0, 2.0, 3.0, 4.0, 4.0])
    assert np.isnan(M.smooth(x, 3)[-1])
    ema = M.smooth(x, 3, "ema")
    assert np.isnan(ema[0]) and ema[1] == 2.0 and ema[2] == 2.0 and ema[-1] == ema[3]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window": 0}, "window"),
        ({"window": 2.5}, "window"),
        ({"window": 4}, "odd"),
        ({"method": "gauss"}, "unknown smoothing"),
    ],
)
def test_smooth_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        M.smooth([1.0, 2.0, 3.0], **kwargs)


def test_smooth_bad_values():
    with pytest.raises(ValueError, match="inf"):
        M.smooth([1.0, np.inf])
    with pytest.raises(ValueError, match="1-D"):
        M.smooth([[1.0, 2.0]])
    with pytest.raises(ValueError, match="numeric"):
        M.smooth(["a", "b"])


# --------------------------------------------------------------------------- final return / tail


def test_tail_count():
    assert M.tail_count(100) == 10
    assert M.tail_count(101) == 11
    assert M.tail_count(30) == 3
    assert M.tail_count(5) == 1
    assert M.tail_count(5, 1.0) == 5
    with pytest.raises(ValueError):
        M.tail_count(0)
    with pytest.raises(ValueError):
        M.tail_count(10, 0.0)


def test_final_return():
    assert M.final_return(np.arange(100.0)) == pytest.approx(np.mean(np.arange(90.0, 100.0)))
    assert M.final_return([1.0, 2.0, 3.0], last_frac=1.0) == pytest.approx(2.0)
    assert M.final_return([5.0, 1.0, np.nan]) != M.final_return([5.0, 1.0, 2.0])
    assert math.isnan(M.final_return([5.0, 1.0, np.nan]))
    assert M.final_return([5.0, 1.0, np.nan], last_frac=1.0) == pytest.approx(3.0)


# --------------------------------------------------------------------------- constraint satisfaction


def test_constraint_satisfaction_rate():
    assert M.constraint_satisfaction_rate([0.0, 5.0, 10.0, 25.0], 10.0) == pytest.approx(0.75)
    assert M.constraint_satisfaction_rate([[1.0, 30.0], [2.0, np.nan]], 10.0) == pytest.approx(2 / 3)
    assert M.constraint_satisfaction_rate([0.0, 0.0], 0.0) == 1.0
    assert math.isnan(M.constraint_satisfaction_rate([np.nan], 1.0))
    with pytest.raises(ValueError, match="cost_limit"):
        M.constraint_satisfaction_rate([1.0], float("nan"))
    with pytest.raises(ValueError, match="empty"):
        M.constraint_satisfaction_rate([], 1.0)


# --------------------------------------------------------------------------- convergence


def test_linear_ramp_unsmoothed_reaches_90_percent_at_900():
    c = M.convergence(STEPS, RAMP, window=1)
    assert c.step == 900.0 and c.index == 90
    assert (c.r_initial, c.r_final, c.target) == pytest.approx((0.0, 100.0, 90.0))
    assert M.learning_efficiency(STEPS, RAMP, window=1) == pytest.approx(100.0 / 900.0)


@pytest.mark.parametrize(("window", "expected"), [(1, 900.0), (3, 900.0), (5, 900.0), (9, 890.0)])
def test_linear_ramp_centered_smoothing(window, expected):
    # truncated edges: R_initial = mean of the first h+1 points = h/2 (h = window // 2), R_final =
    # 100 - h/2, so the target is 90 - 0.4 h: 89.2 for window 5 (first reached at 900), 88.4 for 9.
    c = M.convergence(STEPS, RAMP, window=window)
    h = window // 2
    assert c.target == pytest.approx(90.0 - 0.4 * h)
    assert c.step == expected


def test_decreasing_ramp():
    c = M.convergence(STEPS, 100.0 - RAMP, window=1)
    assert c.step == 900.0 and c.target == pytest.approx(10.0)
    assert M.learning_efficiency(STEPS, 100.0 - RAMP, window=1) == pytest.approx(-100.0 / 900.0)


def test_threshold_parameter():
    assert M.convergence_step(STEPS, RAMP, window=1, threshold=0.5) == 500.0
    assert M.convergence_step(STEPS, RAMP, window=1, threshold=1.0) == 1000.0
    with pytest.raises(ValueError, match="threshold"):
        M.convergence_step(STEPS, RAMP, threshold=0.0)


def test_exponential_approach():
    steps = np.arange(0, 10_001, 1, dtype=float)
    tau = 1000.0
    r = 100.0 * (1.0 - np.exp(-steps / tau))
    r_final = r[-1]
    # first t with 100 (1 - exp(-t/tau)) >= 0.9 r_final
    t_star = -tau * math.log(1.0 - 0.9 * r_final / 100.0)
    c = M.convergence(steps, r, window=1)
    assert c.step == math.ceil(t_star)
    assert M.learning_efficiency(steps, r, window=1) == pytest.approx(r_final / math.ceil(t_star))


def test_flat_curve_converges_at_first_step():
    steps = np.array([100.0, 200.0, 300.0])
    c = M.convergence(steps, [0.1, 0.1, 0.1])
    assert c.step == 100.0 and c.index == 0
    assert M.learning_efficiency(steps, [0.1, 0.1, 0.1]) == 0.0
    # first evaluation at step 0: eta is 0, not 0/0
    assert M.learning_efficiency([0.0, 10.0], [3.0, 3.0]) == 0.0


def test_step_function():
    r = np.where(STEPS >= 500, 100.0, 0.0)
    assert M.convergence_step(STEPS, r, window=1) == 500.0
    # centered window 5 spreads the jump over 490..510: s = 20, 40, 60, 80, 100 at 480..520
    assert M.convergence_step(STEPS, r, window=5) == 520.0
    # a trailing window lags: s reaches 100 (>= 90) at 540
    assert M.convergence_step(STEPS, r, window=5, method="trailing") == 540.0


def test_noisy_curve_smoothing_avoids_early_spike():
    r = RAMP.copy()
    r[20] = 95.0  # a lucky evaluation at step 200
    assert M.convergence_step(STEPS, r, window=1) == 200.0
    assert M.convergence_step(STEPS, r, window=9) > 800.0


def test_convergence_with_nans():
    r = RAMP.copy()
    r[[0, 50, 90]] = np.nan
    c = M.convergence(STEPS, r, window=1)
    assert c.r_initial == 1.0 and c.step == 910.0
    assert M.convergence_step(STEPS, r, window=5) == 900.0
    c = M.convergence(STEPS[:3], [np.nan] * 3)
    assert math.isnan(c.step) and c.index == -1
    assert math.isnan(M.learning_efficiency(STEPS[:3], [np.nan] * 3))


def test_convergence_bad_steps():
    with pytest.raises(ValueError, match="different lengths"):
        M.convergence_step([0.0, 1.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="non-decreasing"):
        M.convergence_step([0.0, 2.0, 1.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="NaN"):
        M.convergence_step([0.0, np.nan], [1.0, 2.0])
    with pytest.raises(ValueError, match=">= 0"):
        M.convergence_step([-1.0, 2.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="empty"):
        M.convergence_step([], [])


def test_single_point_curve():
    c = M.convergence([50.0], [7.0])
    assert c.step == 50.0 and c.r_initial == c.r_final == 7.0


# --------------------------------------------------------------------------- stability


def test_stability_population_std():
    r = np.array([1.0, 3.0, 1.0, 3.0])
    assert M.stability(r) == pytest.approx(1.0)  # seed: sqrt(1/T sum (R - mean)^2)
    ramp = np.arange(100.0)
    assert M.stability(ramp, 0.1) == pytest.approx(np.std(np.arange(90.0, 100.0)))
    assert M.stability([4.0]) == 0.0
    assert M.stability([1.0, np.nan, 3.0]) == pytest.approx(1.0)
    assert math.isnan(M.stability([np.nan, np.nan]))


# --------------------------------------------------------------------------- coordination


def test_coordination_perfect_and_anti_correlation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=200)
    assert M.coordination(np.stack([a, 2 * a + 1, 0.5 * a - 3], axis=1)) == pytest.approx(1.0)
    assert M.coordination(np.stack([a, -a], axis=1)) == pytest.approx(-1.0)
    # ordered pairs: (1,2)=(2,1)=1, the four pairs with agent 3 = -1 -> mean -1/3
    assert M.coordination(np.stack([a, a, -a], axis=1)) == pytest.approx(-1.0 / 3.0)


def test_coordination_independent_columns_near_zero():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20_000, 4))
    assert abs(M.coordination(x)) < 0.02


def test_coordination_matches_corrcoef():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 3)) @ rng.normal(size=(3, 3))
    c = np.corrcoef(x, rowvar=False)
    expected = (c.sum() - np.trace(c)) / (3 * 2)
    assert M.coordination(x) == pytest.approx(expected)


def test_coordination_constant_columns_and_nans():
    a = np.array([0.0, 1.0, 2.0, 3.0])
    const = np.full(4, -0.1)
    # pairs with the constant agent are ignored
    assert M.coordination(np.stack([a, a, const], axis=1)) == pytest.approx(1.0)
    assert math.isnan(M.coordination(np.stack([a, const], axis=1)))
    assert math.isnan(M.coordination(np.zeros((5, 3))))
    # pairwise-complete: NaN steps of one agent only drop those steps for its pairs
    b = np.array([0.0, 1.0, np.nan, 3.0])
    assert M.coordination(np.stack([a, b], axis=1)) == pytest.approx(1.0)
    assert math.isnan(M.coordination(np.array([[1.0, 2.0]])))  # a single step: undefined
    with pytest.raises(ValueError, match="2 agents"):
        M.coordination(np.ones((5, 1)))
    with pytest.raises(ValueError, match="2-D"):
        M.coordination(np.ones(5))


# --------------------------------------------------------------------------- run_metrics


def test_run_metrics_all_keys_and_consistency():
    rng = np.random.default_rng(3)
    returns = RAMP + rng.normal(scale=2.0, size=RAMP.shape)
    costs = rng.uniform(0, 20, size=(RAMP.size, 4))
    logps = rng.normal(size=(300, 3))
    out = M.run_metrics(STEPS, returns, costs, 10.0, logps)
    assert set(out) == {
        "final_return", "r_initial", "r_final", "t_conv", "eta", "sigma", "sigma_last",
        "final_cost", "constraint_satisfaction", "constraint_satisfaction_last", "rho",
    }  # fmt: skip
    assert all(isinstance(v, float) for v in out.values())
    assert out["eta"] == pytest.approx((out["r_final"] - out["r_initial"]) / out["t_conv"])
    assert out["t_conv"] == M.convergence_step(STEPS, returns)
    assert out["final_return"] == pytest.approx(returns[-11:].mean())
    assert out["sigma"] == pytest.approx(np.std(returns))
    assert out["sigma_last"] == pytest.approx(np.std(returns[-11:]))
    assert out["constraint_satisfaction"] == pytest.approx(np.mean(costs <= 10.0))
    assert out["constraint_satisfaction_last"] == pytest.approx(np.mean(costs[-11:] <= 10.0))
    assert out["final_cost"] == pytest.approx(costs[-11:].mean())
    assert out["rho"] == pytest.approx(M.coordination(logps))


def test_run_metrics_minimal_and_per_episode_returns():
    out = M.run_metrics(STEPS, RAMP, window=1)
    assert out["t_conv"] == 900.0
    for k in ("final_cost", "constraint_satisfaction", "constraint_satisfaction_last", "rho"):
        assert math.isnan(out[k])
    per_episode = np.stack([RAMP - 1.0, RAMP + 1.0, np.full_like(RAMP, np.nan)], axis=1)
    out2 = M.run_metrics(STEPS, per_episode, window=1)
    assert out2 == pytest.approx(out, nan_ok=True)
    # costs without a limit: mean cost only
    out3 = M.run_metrics(STEPS, RAMP, costs=np.ones_like(RAMP))
    assert out3["final_cost"] == 1.0 and math.isnan(out3["constraint_satisfaction"])


def test_run_metrics_bad_input():
    with pytest.raises(ValueError, match="different lengths"):
        M.run_metrics(STEPS, RAMP[:-1])
    with pytest.raises(ValueError, match="costs and returns"):
        M.run_metrics(STEPS, RAMP, costs=np.ones(3), cost_limit=1.0)
    with pytest.raises(ValueError, match="empty"):
        M.run_metrics([], [])
    with pytest.raises(ValueError, match="last_frac|frac"):
        M.run_metrics(STEPS, RAMP, last_frac=2.0)


# --------------------------------------------------------------------------- aggregation


@pytest.mark.parametrize(("p", "df", "expected"), [
    (0.975, 1, 12.7062047362), (0.975, 2, 4.30265272975), (0.975, 4, 2.7764451052),
    (0.975, 9, 2.26215716280), (0.975, 30, 2.04227245630), (0.95, 5, 2.01504837333),
    (0.995, 3, 5.84090929976), (0.025, 9, -2.26215716280), (0.5, 7, 0.0),
])  # fmt: skip
def test_t_quantile_table(p, df, expected):
    assert M.t_quantile(p, df) == pytest.approx(expected, abs=1e-8)


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 10, 50, 1000):
        for p in (0.6, 0.9, 0.975, 0.999):
            assert M.t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-8)


def test_mean_ci():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    m, lo, hi = M.mean_ci(x)
    half = 2.7764451052 * np.std(x, ddof=1) / math.sqrt(5)
    assert (m, lo, hi) == pytest.approx((3.0, 3.0 - half, 3.0 + half))
    assert lo < m < hi
    m, lo, hi = M.mean_ci([7.0])
    assert m == 7.0 and math.isnan(lo) and math.isnan(hi)
    with pytest.raises(ValueError, match="NaN"):
        M.mean_ci([1.0, np.nan])
    with pytest.raises(ValueError, match="confidence"):
        M.mean_ci(x, 1.0)


def test_iqm_known_arrays():
    assert M.iqm([1.0, 2.0, 3.0, 4.0]) == pytest.approx(2.5)
    assert M.iqm(np.arange(1.0, 9.0)) == pytest.approx(4.5)  # mean of 3,4,5,6
    assert M.iqm([0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 100.0]) == pytest.approx(1.0)  # outliers cut
    assert M.iqm([1.0, 2.0, 9.0]) == pytest.approx(4.0)  # n < 4: plain mean
    assert M.iqm([[1.0, 2.0], [3.0, 4.0]]) == pytest.approx(2.5)  # [runs, tasks] pooled
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(4)
    for n in range(1, 23):
        x = rng.normal(size=n)
        assert M.iqm(x) == pytest.approx(stats.trim_mean(x, 0.25))


def test_bootstrap_ci_contains_point_and_is_deterministic():
    rng = np.random.default_rng(5)
    x = rng.normal(loc=10.0, size=10)
    for stat in ("mean", "median", "iqm", np.max):
        p, lo, hi = M.bootstrap_ci(x, stat, n_boot=2000, seed=7)
        assert lo <= p <= hi or stat is np.max
        assert M.bootstrap_ci(x, stat, n_boot=2000, seed=7) == (p, lo, hi)
    a = M.iqm_ci(x, seed=1)
    assert a == M.iqm_ci(x, seed=1)
    assert a != M.iqm_ci(x, seed=2)
    assert a[0] == pytest.approx(M.iqm(x))
    assert a[1] <= a[0] <= a[2]


def test_bootstrap_degenerate_and_stratified():
    assert M.bootstrap_ci([3.0, 3.0, 3.0]) == (3.0, 3.0, 3.0)
    assert M.bootstrap_ci([2.0]) == (2.0, 2.0, 2.0)
    # stratified: each task column resampled within itself; constant columns -> no spread
    x = np.array([[0.0, 10.0], [0.0, 10.0], [0.0, 10.0]])
    assert M.bootstrap_ci(x, "mean") == (5.0, 5.0, 5.0)
    p, lo, hi = M.bootstrap_ci(np.arange(40.0).reshape(20, 2), "iqm", n_boot=500)
    assert lo < p < hi


def test_bootstrap_mean_ci_close_to_t_interval():
    rng = np.random.default_rng(6)
    x = rng.normal(size=200)
    _, lo_t, hi_t = M.mean_ci(x)
    _, lo_b, hi_b = M.bootstrap_ci(x, n_boot=5000)
    assert lo_b == pytest.approx(lo_t, abs=0.03) and hi_b == pytest.approx(hi_t, abs=0.03)


def test_bootstrap_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        M.bootstrap_ci([1.0, np.nan])
    with pytest.raises(ValueError, match="n_boot"):
        M.bootstrap_ci([1.0, 2.0], n_boot=0)
    with pytest.raises(ValueError, match="statistic"):
        M.bootstrap_ci([1.0, 2.0], "mode")
    with pytest.raises(ValueError, match="empty"):
        M.iqm([])


def test_aggregate_and_aggregate_runs():
    agg = M.aggregate([1.0, 2.0, np.nan, 3.0, 4.0, 5.0], seed=0)
    assert agg["n"] == 5.0 and agg["mean"] == pytest.approx(3.0)
    assert agg["ci_low"] < agg["mean"] < agg["ci_high"]
    assert agg["iqm_low"] <= agg["iqm"] <= agg["iqm_high"]
    assert agg["std"] == pytest.approx(np.std([1, 2, 3, 4, 5], ddof=1))
    empty = M.aggregate([np.nan])
    assert empty["n"] == 0.0 and all(math.isnan(v) for k, v in empty.items() if k != "n")

    runs = [M.run_metrics(STEPS, RAMP * s, window=1) for s in (1.0, 2.0, 3.0)]
    table = M.aggregate_runs(runs, n_boot=1000)
    assert list(table) == list(runs[0])
    assert table["t_conv"]["mean"] == 900.0
    assert table["final_return"]["mean"] == pytest.approx(2.0 * runs[0]["final_return"])
    assert table["rho"]["n"] == 0.0
    assert M.aggregate_runs(runs, n_boot=1000)["final_return"] == table["final_return"]  # seeded
    with pytest.raises(ValueError, match="empty"):
        M.aggregate_runs([])
