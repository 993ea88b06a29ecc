"""Seed selection on a held-out split carved from the training data (Xie et al., ACL 2021).

`split_heldout` (the carving) lives in `lqf.data`, where ``data.heldout_fraction`` uses it; it is
re-exported here under its public name ``compat.split_heldout``.
"""

from __future__ import annotations

from typing import Any, Sequence

from compat.metrics import error_rate, negative_flip_rate
from lqf.data import split_heldout

SELECTION_CRITERIA = ("nfr", "error_rate")

__all__ = ["SELECTION_CRITERIA", "select_seed", "split_heldout"]


def select_seed(heldout_labels: Any, old_heldout_pred: Any,
                candidate_heldout_preds: Sequence[Any] | Any, *, criterion: str = "nfr") -> int:
  """Index of the candidate (e.g. one per training seed) to ship as the new model.

  Keeps the candidate with the lowest NFR against the old model (``criterion='nfr'``) or the
  lowest error rate (``criterion='error_rate'``) on the held-out split; ties go to the lower error
  rate, then to the lower index. Never pass the test split: selecting on it biases the reported
  test NFR; carve a held-out split from the training data (``data.heldout_fraction`` and the split
  ``'heldout'`` of `lqf.data.get_source`, or `split_heldout` on positions).

  Args:
    heldout_labels: (N,) integer labels of the held-out split.
    old_heldout_pred: (N,) old-model predictions on it.
    candidate_heldout_preds: M arrays (N,) or one (M, N) array of candidate predictions.
    criterion: one of `SELECTION_CRITERIA`.

  Returns:
    The index in [0, M) of the selected candidate.
  """
  if criterion not in SELECTION_CRITERIA:
    raise ValueError(f"criterion={criterion!r} is unknown: use one of {SELECTION_CRITERIA}.")
  if len(candidate_heldout_preds) == 0:
    raise ValueError("candidate_heldout_preds is empty: pass the predictions of at least one "
                     "model.")

  def key(index: int) -> tuple[float, float, int]:
    pred = candidate_heldout_preds[index]
    err = error_rate(heldout_labels, pred)
    if criterion == "nfr":
      return negative_flip_rate(heldout_labels, old_heldout_pred, pred), err, index
    return err, err, index

  return min(range(len(candidate_heldout_preds)), key=key)
