"""Metrics for graceful model updates: prediction flips, retrieval compatibility, update gain.

Conventions:

* Every metric returns a Python ``float`` (``compatibility_criterion`` a ``bool``): they are
  evaluation-time numbers meant for tables and JSON logs. Inputs may be numpy or JAX arrays; the
  flip metrics run on the host (``np.asarray``), so call them on gathered predictions, not under
  ``jax.jit``. Retrieval runs its per-block work as jitted JAX on the default device.
* Predictions and labels are integer class indices of shape ``(N,)``.

Flip metrics over ``N`` samples with labels ``y`` (Yan et al., CVPR 2021; Xie et al., ACL 2021):

* NFR = (1/N) Σ_i 1[ŷ_new,i ≠ y_i ∧ ŷ_old,i = y_i]   (negative flips: old right, new wrong)
* PFR = (1/N) Σ_i 1[ŷ_new,i = y_i ∧ ŷ_old,i ≠ y_i]   (positive flips)
* NFI = NFR / ER_new,   relative NFR = NFR / ((1 − ER_old) · ER_new)

Retrieval compatibility (Shen et al., CVPR 2020): a query set embedded by one model is searched
against a gallery embedded by another with cosine similarity; the empirical compatibility
criterion is M(φ_new, φ_old) > M(φ_old, φ_old) and the update gain is
[M(new, old) − M(old, old)] / [M(new*, new*) − M(old, old)].
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_BLOCK_SIZE = 256


def _labels_and_predictions(labels: Any, *preds: Any) -> list[np.ndarray]:
  """Converts to 1-D host integer arrays of one common length, or raises ValueError."""
  arrays = [np.asarray(labels), *(np.asarray(p) for p in preds)]
  for a in arrays:
    if a.ndim != 1 or a.shape != arrays[0].shape or not np.issubdtype(a.dtype, np.integer):
      raise ValueError("labels and predictions must be 1-D integer arrays of one length: got "
                       f"shapes {[x.shape for x in arrays]}, "
                       f"dtypes {[x.dtype.name for x in arrays]}.")
  if arrays[0].size == 0:
    raise ValueError("labels is empty: flip metrics need at least one sample.")
  return arrays


def _flip_counts(labels: Any, old_pred: Any, new_pred: Any) -> dict[str, int]:
  """Counts of samples, negative/positive flips and old/new errors."""
  y, old, new = _labels_and_predictions(labels, old_pred, new_pred)
  old_right, new_right = old == y, new == y
  return {"n": int(y.size), "negative_flips": int(np.sum(old_right & ~new_right)),
          "positive_flips": int(np.sum(~old_right & new_right)),
          "old_errors": int(np.sum(~old_right)), "new_errors": int(np.sum(~new_right))}


def error_rate(labels: Any, pred: Any) -> float:
  """ER = (1/N) Σ_i 1[ŷ_i ≠ y_i] for ``labels``, ``pred`` of shape (N,)."""
  y, p = _labels_and_predictions(labels, pred)
  return float(np.mean(p != y))


def _ratio_or_zero(numerator: int, denominator: int) -> float:
  return numerator / denominator if denominator > 0 else 0.0


def _rates(c: dict[str, int]) -> dict[str, float]:
  """All flip metrics from the counts of `_flip_counts` (see `flip_summary`).

  NFI and relative NFR are 0.0 when their denominator is 0: the new model is then never wrong or
  the old one never right, so there is no negative flip either.
  """
  n, flips, old_errors, new_errors = c["n"], c["negative_flips"], c["old_errors"], c["new_errors"]
  return {"nfr": flips / n, "pfr": c["positive_flips"] / n,
          "nfi": _ratio_or_zero(flips, new_errors),
          "relative_nfr": _ratio_or_zero(flips * n, (n - old_errors) * new_errors),
          "error_rate_old": old_errors / n, "error_rate_new": new_errors / n,
          "accuracy_old": 1 - old_errors / n, "accuracy_new": 1 - new_errors / n}


def negative_flip_rate(labels: Any, old_pred: Any, new_pred: Any) -> float:
  """NFR = (1/N) Σ_i 1[ŷ_new,i ≠ y_i ∧ ŷ_old,i = y_i]; all arguments of shape (N,)."""
  return _rates(_flip_counts(labels, old_pred, new_pred))["nfr"]


def positive_flip_rate(labels: Any, old_pred: Any, new_pred: Any) -> float:
  """PFR = (1/N) Σ_i 1[ŷ_new,i = y_i ∧ ŷ_old,i ≠ y_i]; all arguments of shape (N,)."""
  return _rates(_flip_counts(labels, old_pred, new_pred))["pfr"]


def negative_flip_impact(labels: Any, old_pred: Any, new_pred: Any) -> float:
  """NFI = NFR / ER_new: the fraction of the new model's errors that are negative flips.

  Returns 0.0 when the new model makes no error (there is then no negative flip either).
  """
  return _rates(_flip_counts(labels, old_pred, new_pred))["nfi"]


def relative_negative_flip_rate(labels: Any, old_pred: Any, new_pred: Any) -> float:
  """Relative NFR = NFR / ((1 − ER_old) · ER_new): NFR relative to independent errors.

  Returns 0.0 when the old model is never right or the new one never wrong (NFR is then 0).
  """
  return _rates(_flip_counts(labels, old_pred, new_pred))["relative_nfr"]


def flip_summary(labels: Any, old_pred: Any, new_pred: Any) -> dict[str, float]:
  """All flip metrics at once (for result tables).

  Returns:
    A dict with keys ``nfr``, ``pfr``, ``nfi``, ``relative_nfr``, ``error_rate_old``,
    ``error_rate_new``, ``accuracy_old``, ``accuracy_new``.
  """
  return _rates(_flip_counts(labels, old_pred, new_pred))


@jax.jit
def _l2_normalize(x: jax.Array) -> jax.Array:
  """Rows scaled to unit norm (all-zero rows stay zero, so their cosine similarity is 0)."""
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, jnp.finfo(x.dtype).tiny)


def _similarity_and_relevance(query: jax.Array, query_labels: jax.Array, query_index: jax.Array,
                              gallery: jax.Array, gallery_labels: jax.Array,
                              exclude_self: bool) -> tuple[jax.Array, jax.Array]:
  """Cosine similarities (B, N) and relevance (B, N) of one query block, self pairs removed.

  With ``exclude_self`` the pair (query_index[b], gallery item query_index[b]) gets similarity −∞
  (ranked last) and is not relevant.
  """
  sim = jnp.dot(query, gallery.T, precision=jax.lax.Precision.HIGHEST)
  relevant = query_labels[:, None] == gallery_labels[None, :]
  if exclude_self:
    is_self = query_index[:, None] == jnp.arange(gallery.shape[0])[None, :]
    sim = jnp.where(is_self, -jnp.inf, sim)
    relevant = relevant & ~is_self
  return sim, relevant


@functools.partial(jax.jit, static_argnames="exclude_self")
def _top1_block(query, query_labels, query_index, gallery, gallery_labels, *, exclude_self):
  """Per query of the block: whether its nearest gallery item has its label, as a 1-tuple."""
  sim, relevant = _similarity_and_relevance(query, query_labels, query_index, gallery,
                                            gallery_labels, exclude_self)
  nearest = jnp.argmax(sim, axis=1)
  hit = jnp.take_along_axis(relevant, nearest[:, None], axis=1)[:, 0]
  return (hit,)


@functools.partial(jax.jit, static_argnames="exclude_self")
def _average_precision_block(query, query_labels, query_index, gallery, gallery_labels, *,
                             exclude_self):
  """Per query of the block: AP = (1/R) Σ_{k: rel_k} precision@k over the ranked gallery.

  Returns the APs (B,) and whether each query has any relevant gallery item (R > 0).
  """
  sim, relevant = _similarity_and_relevance(query, query_labels, query_index, gallery,
                                            gallery_labels, exclude_self)
  order = jnp.argsort(-sim, axis=1, stable=True)
  rel_sorted = jnp.take_along_axis(relevant, order, axis=1)
  hits_at_k = jnp.cumsum(rel_sorted, axis=1, dtype=jnp.int32)
  precision_at_k = hits_at_k / jnp.arange(1, sim.shape[1] + 1, dtype=jnp.float32)
  num_relevant = hits_at_k[:, -1]
  ap = jnp.sum(jnp.where(rel_sorted, precision_at_k, 0.0), axis=1) / jnp.maximum(num_relevant, 1)
  return ap, num_relevant > 0


def _stream_queries(block_fn: Callable[..., tuple[jax.Array, ...]], query_emb: Any,
                    query_labels: Any, gallery_emb: Any, gallery_labels: Any,
                    exclude_self: bool | None, block_size: int) -> tuple[np.ndarray, ...]:
  """Validates the inputs and runs ``block_fn`` over query blocks of ``block_size`` rows.

  Memory is O(block_size × N_gallery); the last block is padded so every block has one shape
  (one compilation). Returns ``block_fn``'s per-query outputs, each of shape (N_query,).
  """
  if exclude_self is None:
    raise ValueError("exclude_self must be given: True when query i and gallery i are the same "
                     "image (e.g. new-query/old-gallery on one set), False for disjoint sets.")
  query, gallery = jnp.asarray(query_emb), jnp.asarray(gallery_emb)
  query_labels, gallery_labels = jnp.asarray(query_labels), jnp.asarray(gallery_labels)
  if (query.ndim != 2 or gallery.ndim != 2 or query.shape[1] != gallery.shape[1]
      or query_labels.shape != query.shape[:1] or gallery_labels.shape != gallery.shape[:1]):
    raise ValueError(f"query_emb (Nq, D), query_labels (Nq,), gallery_emb (Ng, D), gallery_labels "
                     f"(Ng,) expected: got {query.shape}, {query_labels.shape}, {gallery.shape}, "
                     f"{gallery_labels.shape}.")
  if exclude_self and (query.shape[0] != gallery.shape[0] or gallery.shape[0] < 2):
    raise ValueError(f"exclude_self=True needs query and gallery to be the same N >= 2 images: got "
                     f"{query.shape[0]} queries and {gallery.shape[0]} gallery items.")
  if block_size < 1:
    raise ValueError(f"block_size={block_size} must be a positive number of queries.")
  n = query.shape[0]
  block = min(block_size, n)
  pad = -n % block
  query = jnp.pad(_l2_normalize(query), ((0, pad), (0, 0)))
  query_labels = jnp.pad(query_labels, (0, pad))
  query_index = jnp.arange(n + pad)
  gallery = _l2_normalize(gallery)
  outputs = [block_fn(query[s:s + block], query_labels[s:s + block], query_index[s:s + block],
                      gallery, gallery_labels, exclude_self=exclude_self)
             for s in range(0, n + pad, block)]
  return tuple(np.concatenate([np.asarray(o[i]) for o in outputs])[:n]
               for i in range(len(outputs[0])))


def retrieval_top1(query_emb: Any, query_labels: Any, gallery_emb: Any, gallery_labels: Any, *,
                   exclude_self: bool | None = None,
                   block_size: int = DEFAULT_BLOCK_SIZE) -> float:
  """Top-1 retrieval accuracy with cosine similarity, streamed over query blocks.

  Top-1 = (1/Nq) Σ_i 1[label(argmax_j cos(q_i, g_j)) = label(q_i)] (ties: lowest gallery index).
  A query with no relevant gallery item counts as a miss.

  Args:
    query_emb: (Nq, D) query embeddings (e.g. φ_new of the query images).
    query_labels: (Nq,) integer labels.
    gallery_emb: (Ng, D) gallery embeddings (e.g. φ_old of the gallery images).
    gallery_labels: (Ng,) integer labels.
    exclude_self: required. True when query i and gallery i are the same image (Nq = Ng), as in
      new-query/old-gallery evaluation on one set: pair (i, i) is removed from the gallery of
      query i. False when query and gallery are disjoint sets.
    block_size: queries per block; memory is O(block_size × Ng).

  Returns:
    Top-1 accuracy in [0, 1].
  """
  hits, = _stream_queries(_top1_block, query_emb, query_labels, gallery_emb, gallery_labels,
                            exclude_self, block_size)
  return float(np.mean(hits))


def retrieval_map(query_emb: Any, query_labels: Any, gallery_emb: Any, gallery_labels: Any, *,
                  exclude_self: bool | None = None,
                  block_size: int = DEFAULT_BLOCK_SIZE) -> float:
  """Mean average precision with cosine similarity, streamed over query blocks.

  For query i with the gallery ranked by decreasing cosine similarity (ties: lower gallery index
  first) and rel_k = 1[label of the k-th item = label(q_i)]:
  AP_i = (1/R_i) Σ_k rel_k · precision@k, R_i = Σ_k rel_k. mAP is the mean of AP_i over the
  queries with R_i > 0; queries without any relevant gallery item have no AP and are left out
  (``nan`` if no query has one). Each block sorts its (block_size, Ng) similarity rows.

  Args:
    query_emb: (Nq, D) query embeddings.
    query_labels: (Nq,) integer labels.
    gallery_emb: (Ng, D) gallery embeddings.
    gallery_labels: (Ng,) integer labels.
    exclude_self: required. True when query i and gallery i are the same image (Nq = Ng): pair
      (i, i) is removed (neither ranked nor relevant). False for disjoint sets.
    block_size: queries per block; memory is O(block_size × Ng).

  Returns:
    mAP in [0, 1], or ``nan`` when no query has a relevant gallery item.
  """
  ap, has_relevant = _stream_queries(_average_precision_block, query_emb, query_labels,
                                     gallery_emb, gallery_labels, exclude_self, block_size)
  return float(np.mean(ap[has_relevant])) if has_relevant.any() else float("nan")


def compatibility_criterion(m_new_old: float, m_old_old: float) -> bool:
  """Empirical compatibility criterion: M(φ_new query, φ_old gallery) > M(φ_old, φ_old)."""
  return bool(m_new_old > m_old_old)


def update_gain(m_new_old: float, m_old_old: float, m_newstar_newstar: float) -> float:
  """Update gain = [M(new, old) − M(old, old)] / [M(new*, new*) − M(old, old)].

  new* is the new model trained without the compatibility constraint; 1 means the compatible
  update gets all of the unconstrained improvement without backfilling the gallery.
  """
  if m_newstar_newstar == m_old_old:
    raise ValueError(f"update_gain: m_newstar_newstar equals m_old_old ({m_old_old}): the gain is "
                     "undefined when the unconstrained update does not change the metric.")
  return float((m_new_old - m_old_old) / (m_newstar_newstar - m_old_old))
