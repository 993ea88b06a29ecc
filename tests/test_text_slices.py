"""Tests of compat.slices: slice masks and per-slice flip metrics against explicit loops."""

import numpy as np
import pytest

from compat import slices

TEXTS = ["turn on the lights", "don't turn off the fan", "is the door not locked",
         "set a timer for five minutes please now", "what time is it", "never mind",
         "play music", "open the garage door now please quickly thanks"]
CLASSES = ("on", "off", "state", "timer")


def test_length_buckets_partition_by_word_count():
  buckets = slices.length_slices(TEXTS, (2, 4))
  assert list(buckets) == ["words <= 2", "words 3-4", "words > 4"]
  stacked = np.stack(list(buckets.values()))
  np.testing.assert_array_equal(stacked.sum(0), 1)  # each text in exactly one bucket
  for text, which in zip(TEXTS, stacked.T):
    n = len(text.split())
    assert which.tolist() == [n <= 2, 2 < n <= 4, n > 4]
  with pytest.raises(ValueError, match=r"slices.length_edges=\(4, 2\)"):
    slices.length_slices(TEXTS, (4, 2))


def test_negation_keywords_and_regex_slices():
  neg = slices.negation_slices(TEXTS)
  assert neg["negation"].tolist() == [False, True, True, False, False, True, False, False]
  np.testing.assert_array_equal(neg["no negation"], ~neg["negation"])
  keywords = slices.pattern_mask(TEXTS, {"keywords": ["door", "TIME"]})
  assert keywords.tolist() == [False, False, True, False, True, False, False, True]  # not "timer"
  regex = slices.pattern_mask(TEXTS, {"regex": r"^(is|what)\b"})
  assert regex.tolist() == [False, False, True, False, True, False, False, False]
  with pytest.raises(ValueError, match="slices.user.bad.regex"):
    slices.pattern_mask(TEXTS, {"regex": "("}, "bad")
  with pytest.raises(ValueError, match="slices.user.both"):
    slices.pattern_mask(TEXTS, {"regex": "a", "keywords": ["b"]}, "both")


def test_per_slice_flip_metrics_equal_an_explicit_loop():
  rng = np.random.default_rng(0)
  n = 400
  texts = [" ".join(["word"] * int(k)) + (" not" if neg else "")
           for k, neg in zip(rng.integers(1, 12, n), rng.random(n) < 0.3)]
  labels = rng.integers(0, 4, n)
  old = np.where(rng.random(n) < 0.8, labels, rng.integers(0, 4, n))
  new = np.where(rng.random(n) < 0.85, labels, rng.integers(0, 4, n))
  config = {"length_edges": (3, 6), "user": {"long": {"regex": r"(word ){7}"}}}
  built = slices.build_slices(texts, labels, CLASSES, config)
  assert list(built) == list(slices.SLICE_KINDS)
  flat = {name: mask for group in built.values() for name, mask in group.items()}
  got = slices.slice_flips(labels, old, new, flat)
  total = sum(o == y and w != y for o, w, y in zip(old, new, labels))
  for name, mask in flat.items():
    members = [i for i in range(n) if mask[i]]
    flips = sum(old[i] == labels[i] and new[i] != labels[i] for i in members)
    positive = sum(old[i] != labels[i] and new[i] == labels[i] for i in members)
    assert got[name]["n"] == len(members) and got[name]["negative_flips"] == flips
    assert got[name]["nfr"] == pytest.approx(flips / len(members))
    assert got[name]["pfr"] == pytest.approx(positive / len(members))
    assert got[name]["accuracy_new"] == pytest.approx(
        np.mean([new[i] == labels[i] for i in members]))
    assert got[name]["share_of_negative_flips"] == pytest.approx(flips / total)
  # Class slices partition the test set, so their flips add up to all flips.
  assert sum(got[f"class {c}"]["negative_flips"] for c in CLASSES) == total


def test_empty_slice_and_no_flip_report_none():
  labels = np.array([0, 1, 1])
  got = slices.slice_flips(labels, labels, labels,
                           {"none": np.zeros(3, bool), "all": np.ones(3, bool)})
  assert got["none"] == {"n": 0, "negative_flips": 0, "share_of_negative_flips": None,
                         "nfr": None, "pfr": None, "accuracy_old": None, "accuracy_new": None}
  assert got["all"]["nfr"] == 0.0 and got["all"]["share_of_negative_flips"] is None
  with pytest.raises(ValueError, match="slice 'bad' has mask shape"):
    slices.slice_flips(labels, labels, labels, {"bad": np.ones(2, bool)})
