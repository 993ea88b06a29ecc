"""Tests of compat.selection on hand-made cases."""

import numpy as np
import pytest

import compat
import lqf.data
from compat import selection

LABELS = np.array([0, 1, 2, 3, 0, 1, 2, 3])
OLD = np.array([0, 1, 2, 3, 1, 2, 3, 0])  # right on samples 0-3 only


def test_select_seed_picks_lowest_nfr_then_lowest_error_then_lowest_index():
  candidates = [
      np.array([1, 1, 2, 3, 0, 1, 2, 3]),  # 1 negative flip, 1 error
      np.array([0, 1, 2, 3, 1, 2, 3, 0]),  # 0 negative flips, 4 errors
      np.array([0, 1, 2, 3, 0, 1, 3, 0]),  # 0 negative flips, 2 errors
      np.array([0, 1, 2, 3, 0, 2, 2, 0]),  # 0 negative flips, 2 errors (tie with candidate 2)
  ]
  assert selection.select_seed(LABELS, OLD, candidates) == 2
  assert selection.select_seed(LABELS, OLD, np.stack(candidates[::-1])) == 0  # candidate 3 first
  assert selection.select_seed(LABELS, OLD, candidates, criterion="error_rate") == 0
  assert selection.select_seed(LABELS, OLD, candidates[1:2] * 3) == 0  # full tie: lowest index


def test_select_seed_rejects_unknown_criterion():
  with pytest.raises(ValueError, match="criterion='accuracy' is unknown"):
    selection.select_seed(LABELS, OLD, [OLD], criterion="accuracy")


def test_split_heldout_is_a_disjoint_reproducible_partition():
  train, heldout = selection.split_heldout(50, 0.2, seed=3)
  assert len(heldout) == 10 and len(train) == 40
  np.testing.assert_array_equal(np.sort(np.concatenate([train, heldout])), np.arange(50))
  again_train, again_heldout = selection.split_heldout(50, 0.2, seed=3)
  np.testing.assert_array_equal(train, again_train)
  np.testing.assert_array_equal(heldout, again_heldout)
  assert not np.array_equal(heldout, selection.split_heldout(50, 0.2, seed=4)[1])
  perm = np.random.default_rng(3).permutation(50)  # the documented cut: held-out = sort(π[:10])
  np.testing.assert_array_equal(heldout, np.sort(perm[:10]))
  assert compat.split_heldout is selection.split_heldout is lqf.data.split_heldout


@pytest.mark.parametrize("n,fraction,message", [
    (50, 1.0, r"^heldout_fraction=1\.0 is outside \(0, 1\): use a held-out share such as 0\.2\.$"),
    (50, 0.0, r"^heldout_fraction=0\.0 is outside \(0, 1\)"),
    (4, 0.1, r"^heldout_fraction=0\.1 of 4 records gives 0 held-out records: choose a fraction"),
    (4, 0.9, r"^heldout_fraction=0\.9 of 4 records gives 4 held-out records"),
])
def test_split_heldout_rejects_an_empty_part(n, fraction, message):
  with pytest.raises(ValueError, match=message):
    selection.split_heldout(n, fraction, seed=0)
