"""Tests of compat.ensembles against numpy."""

import numpy as np
import pytest

from compat import ensembles


def test_ensemble_logits_and_predict_match_numpy():
  members = np.random.default_rng(0).normal(size=(3, 7, 4)).astype(np.float32)
  expected = (members[0].astype(np.float64) + members[1] + members[2]) / 3
  np.testing.assert_allclose(ensembles.ensemble_logits(list(members)), expected, rtol=1e-6)
  np.testing.assert_allclose(ensembles.ensemble_logits(members), expected, rtol=1e-6)
  np.testing.assert_array_equal(ensembles.ensemble_predict(members), np.argmax(expected, axis=1))


def test_ensemble_of_one_member_is_that_member_and_a_2d_array_is_rejected():
  logits = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
  np.testing.assert_array_equal(ensembles.ensemble_logits([logits]), logits)
  with pytest.raises(ValueError, match=r"\(M, B, K\)"):
    ensembles.ensemble_logits(logits)
