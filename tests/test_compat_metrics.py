"""Tests of compat.metrics against explicit loops, brute force and scikit-learn."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from compat import metrics


def _random_predictions(seed, n=200, num_classes=4):
  rng = np.random.default_rng(seed)
  return tuple(rng.integers(0, num_classes, n) for _ in range(3))


def _loop_counts(y, old, new):
  n = nf = pf = old_err = new_err = 0
  for yi, oi, ni in zip(y.tolist(), old.tolist(), new.tolist()):
    n += 1
    nf += ni != yi and oi == yi
    pf += ni == yi and oi != yi
    old_err += oi != yi
    new_err += ni != yi
  return n, nf, pf, old_err, new_err


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_flip_metrics_match_explicit_loops(seed):
  y, old, new = _random_predictions(seed)
  n, nf, pf, old_err, new_err = _loop_counts(y, old, new)
  er_old, er_new = old_err / n, new_err / n
  expected = {"nfr": nf / n, "pfr": pf / n, "nfi": (nf / n) / er_new,
              "relative_nfr": (nf / n) / ((1 - er_old) * er_new), "error_rate_old": er_old,
              "error_rate_new": er_new, "accuracy_old": 1 - er_old, "accuracy_new": 1 - er_new}
  args = (jnp.asarray(y), old, jnp.asarray(new))  # numpy and JAX inputs mixed
  assert metrics.negative_flip_rate(*args) == pytest.approx(expected["nfr"], abs=1e-12)
  assert metrics.positive_flip_rate(*args) == pytest.approx(expected["pfr"], abs=1e-12)
  assert metrics.negative_flip_impact(*args) == pytest.approx(expected["nfi"], abs=1e-12)
  assert metrics.relative_negative_flip_rate(*args) == pytest.approx(expected["relative_nfr"],
                                                                     abs=1e-12)
  assert metrics.error_rate(y, new) == pytest.approx(er_new, abs=1e-12)
  summary = metrics.flip_summary(*args)
  assert summary == pytest.approx(expected, abs=1e-12)
  assert all(isinstance(v, float) for v in summary.values())


def test_flip_ratio_conventions_when_denominator_is_zero():
  y = np.array([0, 1, 2])
  assert metrics.negative_flip_impact(y, np.array([1, 1, 0]), y) == 0.0  # new never wrong
  assert metrics.relative_negative_flip_rate(y, np.array([1, 2, 0]), np.array([0, 0, 0])) == 0.0


def test_flip_metrics_reject_mismatched_shapes():
  with pytest.raises(ValueError, match="1-D integer arrays"):
    metrics.negative_flip_rate(np.zeros(3, int), np.zeros(3, int), np.zeros(4, int))


def _embeddings(seed, n=37, dim=5, num_classes=4):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, n)
  old = rng.normal(size=(n, dim)).astype(np.float32)
  new = (old + 0.7 * rng.normal(size=(n, dim))).astype(np.float32)
  return labels, new, old


def _cosine(q, g):
  q = q.astype(np.float64) / np.linalg.norm(q, axis=1, keepdims=True)
  g = g.astype(np.float64) / np.linalg.norm(g, axis=1, keepdims=True)
  return q @ g.T


def _brute_force(q, ql, g, gl, exclude_self):
  """Top-1 and mAP with per-query loops, numpy argmax and sklearn's average precision."""
  sim = _cosine(q, g)
  hits, aps = [], []
  for i in range(len(q)):
    keep = np.arange(len(g)) != i if exclude_self else np.ones(len(g), bool)
    scores, relevant = sim[i, keep], gl[keep] == ql[i]
    hits.append(relevant[np.argmax(scores)])
    if relevant.any():
      aps.append(average_precision_score(relevant, scores))
  return float(np.mean(hits)), float(np.mean(aps))


@pytest.mark.parametrize("exclude_self", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_matches_brute_force_and_sklearn(seed, exclude_self):
  labels, new, old = _embeddings(seed)
  if exclude_self:  # new-query / old-gallery on the same images
    q, ql, g, gl = new, labels, old, labels
  else:  # disjoint query and gallery sets
    rng = np.random.default_rng(seed + 10)
    q, ql, g, gl = new[:15], labels[:15], old[15:], rng.permutation(labels[15:])
  top1, mean_ap = _brute_force(q, ql, g, gl, exclude_self)
  for block_size in (4, 1000):  # streamed and unstreamed
    got_top1 = metrics.retrieval_top1(q, ql, g, gl, exclude_self=exclude_self,
                                      block_size=block_size)
    got_map = metrics.retrieval_map(q, ql, g, gl, exclude_self=exclude_self,
                                    block_size=block_size)
    assert got_top1 == pytest.approx(top1, abs=1e-12)
    assert got_map == pytest.approx(mean_ap, abs=1e-5)


def test_exclude_self_removes_the_trivial_match():
  labels, _, old = _embeddings(3)
  # Old query vs old gallery with self included is trivially perfect: every query finds itself.
  assert metrics.retrieval_top1(old, labels, old, labels, exclude_self=False) == 1.0
  top1, mean_ap = _brute_force(old, labels, old, labels, exclude_self=True)
  assert metrics.retrieval_top1(old, labels, old, labels, exclude_self=True) == pytest.approx(top1)
  assert metrics.retrieval_map(old, labels, old, labels, exclude_self=True) == pytest.approx(
      mean_ap, abs=1e-5)
  assert top1 < 1.0


def test_retrieval_map_skips_queries_without_relevant_items():
  q = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
  g = np.array([[1.0, 0.1], [0.9, 1.0], [0.5, -1.0]], np.float32)
  # Query 0 (label 0): cosines 0.995, 0.669, 0.447 rank gallery labels [0, 1, 0], so
  # AP = (1/1 + 2/3) / 2; query 1 (label 5) has no relevant item and is left out.
  got = metrics.retrieval_map(q, np.array([0, 5]), g, np.array([0, 1, 0]), exclude_self=False)
  assert got == pytest.approx((1 + 2 / 3) / 2)
  assert math.isnan(metrics.retrieval_map(q, np.array([7, 5]), g, np.array([0, 1, 0]),
                                          exclude_self=False))


def test_retrieval_requires_explicit_exclude_self():
  labels, new, old = _embeddings(0)
  with pytest.raises(ValueError, match="exclude_self must be given"):
    metrics.retrieval_top1(new, labels, old, labels)
  with pytest.raises(ValueError, match="same N >= 2 images"):
    metrics.retrieval_map(new[:5], labels[:5], old, labels, exclude_self=True)


def test_compatibility_criterion_and_update_gain_on_hand_numbers():
  assert metrics.compatibility_criterion(0.62, 0.60)
  assert not metrics.compatibility_criterion(0.60, 0.60)
  assert not metrics.compatibility_criterion(0.41, 0.60)
  assert metrics.update_gain(0.65, 0.60, 0.70) == pytest.approx(0.5)
  assert metrics.update_gain(0.55, 0.60, 0.70) == pytest.approx(-0.5)
  with pytest.raises(ValueError, match="m_newstar_newstar equals m_old_old"):
    metrics.update_gain(0.65, 0.6, 0.6)
