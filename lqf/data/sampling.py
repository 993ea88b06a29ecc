"""Index selections: k-shot per class, and a random held-out part."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def k_shot_indices(labels: np.ndarray, shots: int, seed: int, *,
                   class_names: Sequence[str] | None = None, field: str = "data.shots") -> np.ndarray:
  """Indices of ``shots`` examples per class, drawn without replacement.

  For every class ``c`` in ``0..max(labels)`` (``0..len(class_names)-1`` if given), ascending, a
  permutation of the positions of ``c`` is drawn from ``np.random.default_rng(seed)`` and its first
  ``shots`` entries are kept. The draws do not depend on ``shots``, so with one seed the k-shot set is
  contained in the k'-shot set for k < k'.

  Args:
    labels: non-negative int array ``(N,)``.
    shots: examples per class, ≥ 1.
    seed: the sampling seed (``data.shot_seed``).
    class_names: optional names of the label ids (their number fixes the class count), used in the
      error message.
    field: the config field that set ``shots``, named in the error message.

  Returns:
    Sorted int64 indices ``(num_classes · shots,)`` into ``labels``.

  Raises:
    ValueError: if ``shots`` < 1 or a class has fewer than ``shots`` examples.
  """
  if shots < 1:
    raise ValueError(f"{field}={shots} is not positive: use {field} >= 1, or None for all.")
  labels = np.asarray(labels)
  counts = np.bincount(labels, minlength=0 if class_names is None else len(class_names))
  if counts.min() < shots:
    c = np.argmin(counts)
    name = repr(class_names[c]) if class_names is not None else f"with label {c}"
    if counts[c] == 0:
      raise ValueError(f"{field}={shots}: class {name} has no examples in this split: "
                       "leave it out of data.classes.")
    raise ValueError(f"{field}={shots} is more than class {name} has in this split "
                     f"({counts.min()} examples): use {field} <= {counts.min()}.")
  rng = np.random.default_rng(seed)
  chosen = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in range(len(counts))]
  return np.sort(np.concatenate(chosen)).astype(np.int64)


def split_heldout(n: int, fraction: float, seed: int, *,
                  field: str = "heldout_fraction") -> tuple[np.ndarray, np.ndarray]:
  """Randomly splits positions 0..n−1 into disjoint (train, held-out) index arrays, each sorted.

  With π = ``np.random.default_rng(seed).permutation(n)`` and h = round(fraction · n), the held-out
  part is sort(π[:h]) and the train part sort(π[h:]).

  Args:
    n: number of positions.
    fraction: the held-out share, in (0, 1).
    seed: the permutation seed.
    field: the config field that set ``fraction``, named in the error message.

  Returns:
    int64 arrays ``(n − h,)`` and ``(h,)``.

  Raises:
    ValueError: if ``fraction`` is outside (0, 1) or either part would be empty.
  """
  if not 0 < fraction < 1:
    raise ValueError(f"{field}={fraction} is outside (0, 1): use a held-out share such as 0.2.")
  num_heldout = int(round(fraction * n))
  if not 0 < num_heldout < n:
    raise ValueError(f"{field}={fraction} of {n} records gives {num_heldout} held-out records: "
                     "choose a fraction that leaves both the train and held-out parts non-empty.")
  perm = np.random.default_rng(seed).permutation(n)
  return np.sort(perm[num_heldout:]), np.sort(perm[:num_heldout])
