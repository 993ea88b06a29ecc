"""k-shot selection on label arrays."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def k_shot_indices(labels: np.ndarray, shots: int, seed: int, *,
                   class_names: Sequence[str] | None = None) -> np.ndarray:
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

  Returns:
    Sorted int64 indices ``(num_classes · shots,)`` into ``labels``.

  Raises:
    ValueError: if ``shots`` < 1 or a class has fewer than ``shots`` examples.
  """
  if shots < 1:
    raise ValueError(f"data.shots={shots} is not positive: use data.shots >= 1, or None for all.")
  labels = np.asarray(labels)
  counts = np.bincount(labels, minlength=0 if class_names is None else len(class_names))
  if counts.min() < shots:
    c = np.argmin(counts)
    name = repr(class_names[c]) if class_names is not None else f"with label {c}"
    if counts[c] == 0:
      raise ValueError(f"data.shots={shots}: class {name} has no examples in this split: "
                       "leave it out of data.classes.")
    raise ValueError(f"data.shots={shots} is more than class {name} has in this split "
                     f"({counts.min()} examples): use data.shots <= {counts.min()}.")
  rng = np.random.default_rng(seed)
  chosen = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in range(len(counts))]
  return np.sort(np.concatenate(chosen)).astype(np.int64)
