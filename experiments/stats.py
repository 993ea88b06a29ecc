"""Statistics of the studies: confidence intervals over seeds, paired comparisons, power.

A study repeats each setting over n independent runs (seeds; a run of a method and of its baseline
share the seed, the data draw and, where the roles allow, the initialization: they are *paired*).
Every number a table reports comes with its 95 % interval and n:

* `mean_interval`: mean ± t_{1−α/2, n−1}·s/√n, s the sample std (ddof = 1). Exact for normal
  data; for means of many 0/1 outcomes (accuracies, flip rates) a good approximation.
* `paired_difference`: the t-interval of mean_i(a_i − b_i) over paired runs — the question "does A
  beat B" is answered by this interval, not by two overlapping per-method intervals.
* `relative_change`: mean(a)/mean(b) − 1 over paired runs (e.g. the relative NFR change of a
  method against its plain baseline), with Fieller's interval: the set of ratios ρ for which the
  paired t-test of a_i − ρ·b_i does not reject mean 0. It is exact for bivariate normal pairs.
  Why not a percentile bootstrap over seeds: simulated here with n = 10 pairs of Poisson flip counts
  (means 15–60, ratios 0.6–1.0, 1,000 data sets each), the bootstrap's 95 % interval covered the
  true ratio 89–91 % of the time and Fieller's 94–95 % (n = 5: 84 % vs 95 %).
* `detectable_difference`: the smallest true mean difference a two-sided paired t-test at level α
  detects with the given power, from the noncentral t distribution (exact for normal data) — the
  power of a study, stated before reading its result.
* `verdict`: whether an interval lies entirely on one side of a threshold (holds / does not hold)
  or straddles it (cannot tell).
* Several source networks (`clustered_interval`, `clustered_paired_difference`, `clustered_p_value`): when
  runs share a pretrained source and the claim is about sources ("LQF beats nonlinear fine-tuning of a
  leaky network"), the unit of replication is the source, not the run. Runs are averaged within each
  source, then the t-interval is taken over the S source means (S − 1 degrees of freedom). For the
  balanced nested model y_sd = μ + u_s + e_sd (u_s ~ N(0, σ_s²) per source, e_sd ~ N(0, σ_d²) per draw,
  m draws each) the source means are iid N(μ, σ_s² + σ_d²/m), so the interval is exact; treating the
  S·m runs as independent under-covers whenever σ_s > 0 (simulated in the tests).
* Many cells read at once ("at every shot count", "in 3 of 8 cells"): `paired_p_value` (the two-sided
  paired t-test behind `paired_difference`) per cell, then `holm` (family-wise error ≤ α for any
  dependence: Holm 1979) or `benjamini_hochberg` (false-discovery rate ≤ α for independent or positively
  dependent tests: Benjamini & Hochberg 1995) adjusted p-values; a cell is resolved at level α when its
  adjusted p ≤ α.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import optimize
from scipy import stats as scipy_stats

CONFIDENCE = 0.95
POWER = 0.8
VERDICTS = ("holds", "does not hold", "cannot tell")


def _as_vector(values: Sequence[float], name: str) -> np.ndarray:
  x = np.asarray(values, np.float64)
  if x.ndim != 1 or x.size < 1 or not np.all(np.isfinite(x)):
    raise ValueError(f"{name} must be finite numbers, one per run: got shape {np.shape(values)}.")
  return x


def _t_quantile(confidence: float, df: int) -> float:
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence={confidence} must lie in (0, 1), e.g. 0.95.")
  return float(scipy_stats.t.ppf(0.5 + confidence / 2, df))


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, float]:
  """The t-interval of the mean of ``values``.

  Returns:
    {'mean', 'std' (sample, ddof = 1), 'n', 'low', 'high'}: mean ± t_{(1+c)/2, n−1}·std/√n; one
    run has std 0 and no interval (low = high = None).
  """
  x = _as_vector(values, "values")
  n, mean = x.size, float(np.mean(x))
  if n == 1:
    return {"mean": mean, "std": 0.0, "n": 1, "low": None, "high": None}
  std = float(np.std(x, ddof=1))
  half = _t_quantile(confidence, n - 1) * std / math.sqrt(n)
  return {"mean": mean, "std": std, "n": int(n), "low": mean - half, "high": mean + half}


def _paired(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  a, b = _as_vector(a, "a"), _as_vector(b, "b")
  if a.shape != b.shape:
    raise ValueError(f"a and b must be paired runs of one length: got {a.size} and {b.size}.")
  return a, b


def paired_difference(a: Sequence[float], b: Sequence[float],
                      confidence: float = CONFIDENCE) -> dict[str, float]:
  """The t-interval of mean_i(a_i − b_i) over n paired runs (`mean_interval` of the differences)."""
  a, b = _paired(a, b)
  return mean_interval(a - b, confidence)


def paired_p_value(a: Sequence[float], b: Sequence[float]) -> float:
  """The two-sided p-value of the paired t-test of mean_i(a_i − b_i) = 0 over n ≥ 2 paired runs:
  2·(1 − F_{n−1}(|d̄|/(s_d/√n))), F the t distribution's CDF (s_d = 0: 0 if d̄ ≠ 0, else 1)."""
  a, b = _paired(a, b)
  if a.size < 2:
    raise ValueError(f"a paired t-test needs at least 2 runs: got {a.size}.")
  d = a - b
  mean, std = float(np.mean(d)), float(np.std(d, ddof=1))
  if std == 0.0:
    return 1.0 if mean == 0.0 else 0.0
  t = abs(mean) / (std / math.sqrt(d.size))
  return float(2.0 * scipy_stats.t.sf(t, d.size - 1))


def _cluster_means(values: Sequence[float], clusters: Sequence[int]) -> np.ndarray:
  """The mean of ``values`` within each cluster, in sorted cluster order (≥ 2 clusters)."""
  x = _as_vector(values, "values")
  ids = np.asarray(clusters)
  if ids.shape != x.shape:
    raise ValueError(f"clusters must name one cluster (source) per run: got {ids.size} for {x.size} runs.")
  names, index = np.unique(ids, return_inverse=True)
  if names.size < 2:
    raise ValueError(f"an interval over sources needs at least 2 sources: got {names.size}.")
  return np.bincount(index, weights=x) / np.bincount(index)


def clustered_interval(values: Sequence[float], clusters: Sequence[int],
                       confidence: float = CONFIDENCE) -> dict[str, float]:
  """The two-level t-interval of the mean: `mean_interval` of the per-cluster means ȳ_s (module
  docstring); 'n' is the number of clusters S and 'runs' the number of values."""
  return {**mean_interval(_cluster_means(values, clusters), confidence), "runs": len(values)}


def clustered_paired_difference(a: Sequence[float], b: Sequence[float], clusters: Sequence[int],
                                confidence: float = CONFIDENCE) -> dict[str, float]:
  """`clustered_interval` of the paired differences a_i − b_i (runs paired within their cluster)."""
  a, b = _paired(a, b)
  return clustered_interval(a - b, clusters, confidence)


def clustered_p_value(a: Sequence[float], b: Sequence[float], clusters: Sequence[int]) -> float:
  """The two-sided p-value that goes with `clustered_paired_difference`: the paired t-test over the S
  per-cluster means of a and of b."""
  a, b = _paired(a, b)
  return paired_p_value(_cluster_means(a, clusters), _cluster_means(b, clusters))


def _adjust(p_values: Sequence[float], scale, accumulate) -> np.ndarray:
  """Adjusted p-values: min(1, scale(rank)·p) of the ascending p, made monotone by ``accumulate``."""
  p = _as_vector(p_values, "p_values")
  if np.any((p < 0) | (p > 1)):
    raise ValueError(f"p-values must lie in [0, 1]: got {p.tolist()}.")
  order = np.argsort(p, kind="stable")
  ranks = np.arange(1, p.size + 1)
  adjusted = accumulate(np.minimum(1.0, scale(ranks, p.size) * p[order]))
  out = np.empty_like(adjusted)
  out[order] = adjusted
  return out


def holm(p_values: Sequence[float]) -> np.ndarray:
  """Holm's step-down adjusted p-values: for the i-th smallest p, max_{j ≤ i} min(1, (m − j + 1)·p_(j)).
  Rejecting the hypotheses with adjusted p ≤ α keeps the family-wise error rate ≤ α."""
  return _adjust(p_values, lambda i, m: m - i + 1, np.maximum.accumulate)


def benjamini_hochberg(p_values: Sequence[float]) -> np.ndarray:
  """Benjamini–Hochberg step-up adjusted p-values: for the i-th smallest p, min_{j ≥ i} min(1, m·p_(j)/j).
  Rejecting those ≤ q keeps the false-discovery rate ≤ q (independent or positively dependent tests)."""
  return _adjust(p_values, lambda i, m: m / i, lambda x: np.minimum.accumulate(x[::-1])[::-1])


def relative_change(a: Sequence[float], b: Sequence[float],
                    confidence: float = CONFIDENCE) -> dict[str, float | None]:
  """mean(a)/mean(b) − 1 over n paired runs, with Fieller's interval.

  With ā, b̄ the means and s_aa, s_bb, s_ab the sample (co)variances divided by n, the interval of
  ρ = E[a]/E[b] is {ρ : (ā − ρ·b̄)² ≤ t²·(s_aa − 2ρ·s_ab + ρ²·s_bb)}, t = t_{(1+c)/2, n−1}: the ρ
  whose paired t-test of a_i − ρ·b_i keeps mean 0. It is a bounded interval when b̄ differs from 0
  at that level (b̄² > t²·s_bb); otherwise (and for one run) the data cannot bound the ratio and
  low/high are None.

  Returns:
    {'estimate': ā/b̄ − 1, 'low', 'high' (None when unbounded), 'n'}.
  """
  a, b = _paired(a, b)
  n = a.size
  mean_a, mean_b = float(np.mean(a)), float(np.mean(b))
  if mean_b == 0.0:
    raise ValueError("mean(b) is 0: the relative change against a baseline without events is "
                     "undefined.")
  if n == 1:
    return {"estimate": mean_a / mean_b - 1.0, "low": None, "high": None, "n": 1}
  cov = np.cov(np.stack([a, b]), ddof=1) / n
  t2 = _t_quantile(confidence, n - 1) ** 2
  qa = mean_b**2 - t2 * cov[1, 1]
  qb = -2.0 * (mean_a * mean_b - t2 * cov[0, 1])
  qc = mean_a**2 - t2 * cov[0, 0]
  disc = qb * qb - 4.0 * qa * qc
  low = high = None
  if qa > 0 and disc >= 0:
    root = math.sqrt(disc)
    low, high = (-qb - root) / (2 * qa) - 1.0, (-qb + root) / (2 * qa) - 1.0
  return {"estimate": mean_a / mean_b - 1.0, "low": low, "high": high, "n": int(n)}


def detectable_difference(sd: float, n: int, confidence: float = CONFIDENCE,
                          power: float = POWER) -> float:
  """The smallest |mean difference| a two-sided paired t-test detects with probability ``power``.

  With differences of standard deviation ``sd`` over ``n`` pairs and t* = t_{(1+c)/2, n−1}, it
  solves P(|T| > t*) = power for T ~ noncentral t(n − 1, δ√n/sd).
  """
  if n < 2 or not sd > 0 or not 0.0 < power < 1.0:
    raise ValueError(f"detectable_difference needs n >= 2, sd > 0, power in (0, 1): got n={n}, "
                     f"sd={sd}, power={power}.")
  df, critical = n - 1, _t_quantile(confidence, n - 1)

  def shortfall(effect: float) -> float:
    nc = effect * math.sqrt(n) / sd
    # The lower rejection tail is ~0 for δ > 0 (scipy returns NaN far out in it).
    lower = np.nan_to_num(scipy_stats.nct.cdf(-critical, df, nc))
    return scipy_stats.nct.sf(critical, df, nc) + lower - power
  upper = sd * (critical + scipy_stats.norm.ppf(power)) / math.sqrt(n)
  while shortfall(upper) < 0:  # the noncentral t is wider than the normal for few pairs
    upper *= 2
  return float(optimize.brentq(shortfall, 0.0, upper, xtol=1e-12 * sd))


def verdict(low: float | None, high: float | None, threshold: float, *, below: bool) -> str:
  """'holds' when the whole interval meets the claim (≤ threshold if ``below``, else ≥), 'does not
  hold' when none of it does, 'cannot tell' when it straddles the threshold or is unbounded."""
  if low is None or high is None:
    return VERDICTS[2]
  meets_all, meets_none = (high <= threshold, low > threshold) if below else (
      low >= threshold, high < threshold)
  return VERDICTS[0] if meets_all else VERDICTS[1] if meets_none else VERDICTS[2]


def half_width(stat: dict) -> float:
  """high − mean of a `mean_interval` entry (an error bar); 0 for one run (no interval)."""
  return 0.0 if stat["high"] is None else stat["high"] - stat["mean"]


def format_interval(stat: dict, scale: float = 100.0, digits: int = 2, signed: bool = False) -> str:
  """``"mean [low, high]"`` of a `mean_interval` / `paired_difference` / `relative_change` entry,
  scaled (×100: percent or points); an unbounded interval shows as [−∞, ∞]."""
  estimate = stat["mean"] if "mean" in stat else stat["estimate"]
  sign = "+" if signed else ""

  def fmt(value, inf):
    return inf if value is None else f"{scale * value:{sign}.{digits}f}"
  return f"{fmt(estimate, 'n/a')} [{fmt(stat['low'], '−∞')}, {fmt(stat['high'], '∞')}]"
