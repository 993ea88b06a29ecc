"""Tests of experiments.stats against hand-computed values, brute force and simulated coverage.

Simulation tolerances are derived from the binomial sampling error of a rate estimated from S
independent simulated data sets: 4·sqrt(p(1 − p)/S) around the nominal p (a false alarm of such
a deterministic, seeded test would need a 4-sigma draw).
"""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from experiments import stats

# t_{0.975, 4} from a printed t table (Student's t, 4 degrees of freedom, two-sided 95 %).
T_975_DF4 = 2.7764451051977987


def _binomial_tolerance(p, simulations):
  return 4 * math.sqrt(p * (1 - p) / simulations)


def test_mean_interval_by_hand():
  got = stats.mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])
  half = T_975_DF4 * math.sqrt(2.5) / math.sqrt(5)  # s² = 10/4
  assert got["mean"] == pytest.approx(3.0) and got["std"] == pytest.approx(math.sqrt(2.5))
  assert got["n"] == 5
  assert (got["low"], got["high"]) == pytest.approx((3.0 - half, 3.0 + half), rel=1e-12)
  one = stats.mean_interval([0.7])
  assert one == {"mean": 0.7, "std": 0.0, "n": 1, "low": None, "high": None}


def test_paired_difference_matches_scipy_ttest_rel():
  rng = np.random.default_rng(0)
  a = rng.normal(3.0, 1.0, 10)
  b = a - rng.normal(0.5, 0.3, 10)
  got = stats.paired_difference(a, b)
  ci = scipy_stats.ttest_rel(a, b).confidence_interval(0.95)
  assert (got["low"], got["high"]) == pytest.approx((ci.low, ci.high), rel=1e-10)
  assert got["mean"] == pytest.approx(np.mean(a - b))
  with pytest.raises(ValueError, match="paired runs of one length"):
    stats.paired_difference(a, b[:5])


def test_mean_interval_covers_at_the_nominal_rate():
  rng = np.random.default_rng(1)
  simulations, n, covered = 4000, 10, 0
  for _ in range(simulations):
    ci = stats.mean_interval(rng.normal(2.0, 3.0, n))
    covered += ci["low"] <= 2.0 <= ci["high"]
  assert abs(covered / simulations - 0.95) <= _binomial_tolerance(0.95, simulations)


def test_relative_change_is_the_set_of_ratios_a_paired_t_test_keeps():
  """Brute force: scan ρ, keep those whose paired t-test of a − ρ·b has p ≥ 0.05."""
  rng = np.random.default_rng(2)
  b = rng.poisson(20, 10).astype(float)
  a = rng.poisson(0.7 * b + 1).astype(float)
  got = stats.relative_change(a, b)
  grid = np.linspace(0.0, 2.0, 200001)
  kept = [rho for rho in grid[::100]
          if scipy_stats.ttest_1samp(a - rho * b, 0.0).pvalue >= 0.05]
  low, high = min(kept), max(kept)
  step = grid[100] - grid[0]
  assert got["low"] + 1 == pytest.approx(low, abs=step)
  assert got["high"] + 1 == pytest.approx(high, abs=step)
  assert got["estimate"] == pytest.approx(a.mean() / b.mean() - 1)
  assert got["low"] < got["estimate"] < got["high"]


def test_relative_change_covers_the_true_ratio_at_the_nominal_rate():
  """Fieller's interval is exact for bivariate normal pairs: coverage 95 % at n = 10."""
  rng = np.random.default_rng(3)
  simulations, n, ratio, covered = 4000, 10, 0.6, 0
  cov = [[16.0, 6.0], [6.0, 9.0]]  # correlated, as paired models' flip counts are
  for _ in range(simulations):
    b, noise = rng.multivariate_normal([0.0, 0.0], cov, n).T
    b = 20.0 + b
    a = ratio * 20.0 + noise
    ci = stats.relative_change(a, b)
    covered += ci["low"] <= ratio - 1 <= ci["high"]
  assert abs(covered / simulations - 0.95) <= _binomial_tolerance(0.95, simulations)


def test_relative_change_without_a_resolved_baseline_is_unbounded():
  got = stats.relative_change([1.0, 0.0, 2.0], [1.0, -1.0, 0.5])
  assert got["low"] is None and got["high"] is None
  assert stats.relative_change([2.0], [4.0]) == {"estimate": -0.5, "low": None, "high": None, "n": 1}


def test_detectable_difference_has_the_stated_power():
  rng = np.random.default_rng(4)
  n, sd, simulations = 10, 2.0, 4000
  effect = stats.detectable_difference(sd, n)
  rejected = sum(scipy_stats.ttest_1samp(rng.normal(effect, sd, n), 0.0).pvalue < 0.05
                 for _ in range(simulations))
  assert abs(rejected / simulations - 0.8) <= _binomial_tolerance(0.8, simulations)
  # Large n: the normal approximation (z_{0.975} + z_{0.8})·sd/√n.
  z = scipy_stats.norm.ppf(0.975) + scipy_stats.norm.ppf(0.8)
  assert stats.detectable_difference(sd, 20000) == pytest.approx(z * sd / math.sqrt(20000),
                                                                 rel=1e-3)


@pytest.mark.parametrize("low, high, expected", [
    (-0.8, -0.5, "holds"), (-0.3, -0.1, "does not hold"), (-0.6, -0.2, "cannot tell"),
    (None, None, "cannot tell")])
def test_verdict_below_a_threshold(low, high, expected):
  assert stats.verdict(low, high, -0.4, below=True) == expected


def test_verdict_above_a_threshold():
  assert stats.verdict(0.01, 0.03, 0.0, below=False) == "holds"
  assert stats.verdict(-0.03, -0.01, 0.0, below=False) == "does not hold"
  assert stats.verdict(-0.01, 0.03, 0.0, below=False) == "cannot tell"


def test_format_interval():
  assert stats.format_interval({"mean": 0.0123, "low": 0.01, "high": 0.0146}) == "1.23 [1.00, 1.46]"
  assert stats.format_interval({"estimate": -0.25, "low": None, "high": None}, digits=0,
                               signed=True) == "-25 [−∞, ∞]"


def test_paired_p_value_matches_scipy_ttest_rel():
  rng = np.random.default_rng(11)
  a, b = rng.normal(1.0, 1.0, 10), rng.normal(0.4, 1.0, 10)
  assert stats.paired_p_value(a, b) == pytest.approx(scipy_stats.ttest_rel(a, b).pvalue, rel=1e-10)
  assert stats.paired_p_value([1.0, 1.0], [1.0, 1.0]) == 1.0
  assert stats.paired_p_value([2.0, 3.0], [1.0, 2.0]) == 0.0


# Benjamini & Hochberg (1995), section 4: 15 p-values of a study of myocardial infarction treatments. At
# level 0.05 their procedure rejects the 4 smallest; the Bonferroni-type procedures reject 3.
BH_1995 = [0.0201, 0.7590, 0.0001, 0.0278, 0.0004, 0.0298, 0.0019, 0.6528, 0.0344, 0.0095, 0.0459,
           0.3240, 0.4262, 0.5719, 1.000]


def test_multiplicity_corrections_reproduce_the_published_example():
  p = np.array(BH_1995)
  smallest = np.sort(p)
  assert set(p[stats.benjamini_hochberg(p) <= 0.05]) == set(smallest[:4])
  assert set(p[stats.holm(p) <= 0.05]) == set(smallest[:3])


def _holm_by_steps(p, alpha):
  """Holm's procedure as published: walk the sorted p, reject while p_(i) ≤ α/(m − i + 1)."""
  rejected = set()
  for i, idx in enumerate(np.argsort(p)):
    if p[idx] > alpha / (len(p) - i):
      break
    rejected.add(int(idx))
  return rejected


def _bh_by_steps(p, q):
  """BH as published: the largest k with p_(k) ≤ k·q/m; reject the k smallest."""
  order = np.argsort(p)
  passing = [k for k in range(1, len(p) + 1) if p[order[k - 1]] <= k * q / len(p)]
  return {int(i) for i in order[:max(passing, default=0)]}


def test_adjusted_p_values_reject_what_the_procedures_reject():
  rng = np.random.default_rng(3)
  for _ in range(200):
    p = np.concatenate([rng.uniform(0, 0.02, rng.integers(0, 4)), rng.uniform(0, 1, 6)])
    for alpha in (0.01, 0.05, 0.1):
      assert set(np.flatnonzero(stats.holm(p) <= alpha)) == _holm_by_steps(p, alpha)
      assert set(np.flatnonzero(stats.benjamini_hochberg(p) <= alpha)) == _bh_by_steps(p, alpha)


def test_holm_keeps_the_family_wise_error_under_the_null():
  """8 true null hypotheses per family (uniform p-values), 4,000 families: Holm rejects any in ≤ 5 % of
  them (+ 3 binomial standard errors); uncorrected testing in about 1 − 0.95⁸ = 34 %."""
  rng = np.random.default_rng(5)
  p = rng.uniform(size=(4000, 8))
  any_rejected = np.mean([np.any(stats.holm(row) <= 0.05) for row in p])
  assert any_rejected <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 4000)
  assert np.mean(np.any(p <= 0.05, axis=1)) > 0.3


def test_clustered_interval_is_the_t_interval_of_the_source_means():
  """By hand: 3 sources with 2, 2 and 3 runs → the t-interval (2 df) of their three means."""
  values, clusters = [1.0, 3.0, 4.0, 6.0, 0.0, 1.0, 5.0], [0, 0, 1, 1, 2, 2, 2]
  means = np.array([2.0, 5.0, 2.0])
  got = stats.clustered_interval(values, clusters)
  half = scipy_stats.t.ppf(0.975, 2) * np.std(means, ddof=1) / math.sqrt(3)
  assert got["n"] == 3 and got["runs"] == 7 and got["mean"] == pytest.approx(3.0)
  assert (got["low"], got["high"]) == pytest.approx((3.0 - half, 3.0 + half), rel=1e-12)
  a, b = np.array(values) + 1.0, np.array(values) * 0.5
  paired = stats.clustered_paired_difference(a, b, clusters)
  assert paired["mean"] == pytest.approx(np.mean(1.0 + 0.5 * means))
  p = scipy_stats.ttest_1samp(1.0 + 0.5 * means, 0.0).pvalue
  assert stats.clustered_p_value(a, b, clusters) == pytest.approx(p, rel=1e-10)
  with pytest.raises(ValueError, match="at least 2 sources"):
    stats.clustered_interval([1.0, 2.0], [4, 4])
  with pytest.raises(ValueError, match="one cluster"):
    stats.clustered_interval([1.0, 2.0], [0, 1, 1])


def test_clustered_interval_covers_across_sources_and_the_naive_one_does_not():
  """The nested model of the module docstring, S = 5 sources × m = 2 draws, σ_s = 2, σ_d = 0.5, 4,000
  simulated studies: the two-level interval covers μ at 95 % (± 4 binomial SE); the t-interval over all
  10 runs as if independent covers far less (79 % in this simulation: its squared standard error is ≈ 0.44
  of the variance of the mean)."""
  rng = np.random.default_rng(7)
  simulations, sources, draws, mu = 4000, 5, 2, 1.0
  clusters = np.repeat(np.arange(sources), draws)
  two_level = naive = 0
  for _ in range(simulations):
    y = mu + np.repeat(rng.normal(0.0, 2.0, sources), draws) + rng.normal(0.0, 0.5, sources * draws)
    ci, flat = stats.clustered_interval(y, clusters), stats.mean_interval(y)
    two_level += ci["low"] <= mu <= ci["high"]
    naive += flat["low"] <= mu <= flat["high"]
  assert abs(two_level / simulations - 0.95) <= _binomial_tolerance(0.95, simulations)
  assert naive / simulations < 0.95 - 4 * _binomial_tolerance(0.95, simulations)
