"""Behavioural slices of a text test set and the flip metrics on each (CheckList-style).

A *slice* is a boolean mask (N,) over the test examples. `build_slices` makes the standard ones —
length buckets (word counts), one per class, negation present / absent — plus user-defined slices
from a config (a regular expression or a keyword list per slice), and `slice_flips` reports on
each slice S the flip metrics restricted to it, e.g.

  NFR_S = (1/|S|) Σ_{i∈S} 1[ŷ_new,i ≠ y_i ∧ ŷ_old,i = y_i],

and the share of all negative flips that fall in S, so a user sees *where* an update regresses.
Slices may overlap (a text can be short, negated and of class k).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np

from compat.metrics import flip_summary

# Whole-word English negations (and the clitic n't, as in "isn't").
NEGATION_PATTERN = (r"\b(not|no|never|nothing|nobody|none|neither|nor|nowhere|without|cannot)\b"
                    r"|n't\b")
SLICE_KINDS = ("length", "class", "negation", "user")


def word_counts(texts: Sequence[str]) -> np.ndarray:
  """Whitespace-separated words per text, (N,) int."""
  return np.array([len(t.split()) for t in texts], np.int64)


def length_slices(texts: Sequence[str], edges: Sequence[int]) -> dict[str, np.ndarray]:
  """Buckets of word count w cut at increasing ``edges`` e_1 < … < e_m.

  Buckets: w ≤ e_1, e_1 < w ≤ e_2, …, w > e_m, named like ``'words 5-8'``.
  """
  edges = [int(e) for e in edges]
  if not edges or any(b <= a for a, b in zip(edges, edges[1:])) or edges[0] < 1:
    raise ValueError(f"slices.length_edges={tuple(edges)} must be increasing positive word "
                     "counts, e.g. (4, 8).")
  words = word_counts(texts)
  bounds = [0, *edges, np.inf]
  out = {}
  for lo, hi in zip(bounds, bounds[1:]):
    name = (f"words > {lo}" if hi == np.inf else f"words <= {hi}" if lo == 0
            else f"words {lo + 1}-{hi}")
    out[name] = (words > lo) & (words <= hi)
  return out


def class_slices(labels: Any, class_names: Sequence[str]) -> dict[str, np.ndarray]:
  """One slice per class k: the examples whose label is k, named ``'class <name>'``."""
  labels = np.asarray(labels)
  return {f"class {name}": labels == k for k, name in enumerate(class_names)}


def pattern_mask(texts: Sequence[str], spec: Mapping[str, Any], name: str = "") -> np.ndarray:
  """Texts matching ``spec``: ``{'regex': r'...'}`` (re.search, case-insensitive) or
  ``{'keywords': [...]}`` (any keyword as a whole word or phrase, case-insensitive)."""
  if set(spec) == {"regex"}:
    try:
      pattern = re.compile(spec["regex"], re.IGNORECASE)
    except re.error as e:
      raise ValueError(f"slices.user.{name}.regex={spec['regex']!r} is not a valid regular "
                       f"expression: {e}.") from None
  elif set(spec) == {"keywords"} and len(spec["keywords"]) > 0:
    words = "|".join(re.escape(str(k)) for k in spec["keywords"])
    pattern = re.compile(rf"\b(?:{words})\b", re.IGNORECASE)
  else:
    raise ValueError(f"slices.user.{name}={dict(spec)} must be {{'regex': '...'}} or "
                     "{'keywords': ['...', ...]}.")
  return np.array([pattern.search(t) is not None for t in texts], bool)


def negation_slices(texts: Sequence[str]) -> dict[str, np.ndarray]:
  """``'negation'`` (a `NEGATION_PATTERN` word present) and its complement ``'no negation'``."""
  negated = pattern_mask(texts, {"regex": NEGATION_PATTERN})
  return {"negation": negated, "no negation": ~negated}


def build_slices(texts: Sequence[str], labels: Any, class_names: Sequence[str],
                 config: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
  """All slices, grouped by kind (`SLICE_KINDS`): ``{kind: {slice name: mask (N,)}}``.

  Args:
    texts: the N test texts.
    labels: (N,) integer labels.
    class_names: the K class names.
    config: the ``slices`` config section: ``length_edges`` (word-count cuts), ``user``
      (``{name: {'regex': ...} | {'keywords': [...]}}``, may be empty).
  """
  user = config.get("user") or {}
  return {"length": length_slices(texts, config["length_edges"]),
          "class": class_slices(labels, class_names),
          "negation": negation_slices(texts),
          "user": {name: pattern_mask(texts, spec, name) for name, spec in user.items()}}


def slice_flips(labels: Any, old_pred: Any, new_pred: Any,
                slices: Mapping[str, np.ndarray]) -> dict[str, dict[str, float | None]]:
  """Flip metrics on each slice.

  Args:
    labels, old_pred, new_pred: (N,) integer arrays.
    slices: ``{name: mask (N,) bool}``.

  Returns:
    ``{name: {'n', 'negative_flips', 'nfr', 'pfr', 'accuracy_old', 'accuracy_new',
    'share_of_negative_flips'}}``: NFR/PFR/accuracies as in `compat.flip_summary` on the slice's
    examples (None for an empty slice); the share is the slice's negative flips over all of them
    (None when the update has none).
  """
  y, old, new = (np.asarray(a) for a in (labels, old_pred, new_pred))
  negative = (old == y) & (new != y)
  total = int(negative.sum())
  out = {}
  for name, mask in slices.items():
    mask = np.asarray(mask, bool)
    if mask.shape != y.shape:
      raise ValueError(f"slice {name!r} has mask shape {mask.shape}; the labels have {y.shape}.")
    n, flips = int(mask.sum()), int(negative[mask].sum())
    row = {"n": n, "negative_flips": flips,
           "share_of_negative_flips": flips / total if total else None}
    summary = flip_summary(y[mask], old[mask], new[mask]) if n else {}
    for key in ("nfr", "pfr", "accuracy_old", "accuracy_new"):
      row[key] = summary.get(key)
    out[name] = row
  return out
