"""Recompute BatchNorm running statistics from data: exact population statistics, layer by layer.

After loading weights into a different architecture (ReLU weights into a leaky-ReLU ResNet), or after
a short training run whose running averages lag behind, the stored statistics no longer describe the
activations the network produces in inference mode. `recalibrate_batch_stats` replaces them with
the exact statistics of the given data.
"""

from __future__ import annotations

from typing import Any, Iterable

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from lqf.models.resnet import ResNet

Variables = dict[str, Any]
_MOMENTS = "bn_moments"


def _sow_bn_input_moments(next_fun, args, kwargs, context):
  """Method interceptor: every BatchNorm sows (count, mean, M2) of its input per channel."""
  if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
    x = args[0].astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    context.module.sow(_MOMENTS, "moments", (jnp.asarray(np.prod(x.shape[:-1]), jnp.int32), mean,
                                             jnp.sum(jnp.square(x - mean), axes)))
  return next_fun(*args, **kwargs)


def _merge(a: tuple[int, np.ndarray, np.ndarray] | None, count: int, mean: np.ndarray,
           m2: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
  """Chan et al.'s pairwise update of (count, mean, M2 = Σ(x − mean)²), in float64."""
  mean, m2 = np.asarray(mean, np.float64), np.asarray(m2, np.float64)
  if a is None:
    return count, mean, m2
  n_a, mean_a, m2_a = a
  n = n_a + count
  delta = mean - mean_a
  return n, mean_a + delta * count / n, m2_a + m2 + delta ** 2 * n_a * count / n


def recalibrate_batch_stats(model: ResNet, variables: Variables,
                            batches: Iterable[jax.Array]) -> Variables:
  """Returns ``variables`` with every BatchNorm's running (mean, var) recomputed from ``batches``.

  Layer by layer, in inference mode: BatchNorm layer k gets, per channel,
  μ_k = (1/M) Σ x and σ²_k = (1/M) Σ (x − μ_k)² (biased, as Flax's running variance) over all
  M = N·H·W values of its input x on the N images of all batches, where x is computed in inference
  mode with layers 1..k−1 already recalibrated. Afterwards each BatchNorm standardises its input
  exactly over the data in the network as it is used at inference (and as LQF linearises it). These
  are the statistics train mode with momentum 0 would record if all images formed one batch; they
  differ from an average of per-batch train-mode statistics, whose deeper layers see inputs
  normalised with each batch's own statistics. Per-batch moments are merged with Chan et al.'s
  pairwise update in float64, so the batches may have different sizes.

  Cost: the data goes through the network one split point (``model.split_points()``) at a time, the
  input of the current block cached for all batches. A block with K BatchNorm layers takes K passes
  through that block (after pass j the first j layers in execution order are exact) and one more to
  produce the next block's input — about 4–5 network passes in all for ResNet-50. Memory: one
  block input for every image (ResNet-50 at 224 px: at most 56·56·256 floats = 3.2 MB per image).

  Args:
    model: the ResNet the variables belong to.
    variables: ``{'params': ..., 'batch_stats': ...}``.
    batches: images (B, H, W, C) as the model takes them, e.g. ``pretrained.recalibrate_batches``
      batches of the training set (without augmentation unless it is used at inference too).

  Returns:
    ``variables`` with new ``batch_stats`` (float32); ``params`` are unchanged.
  """
  inputs = [jnp.asarray(b) for b in batches]
  if not inputs:
    raise ValueError("recalibrate_batch_stats got no batches: set pretrained.recalibrate_batches >= 1.")
  stats = flax.traverse_util.flatten_dict(variables["batch_stats"])
  points = model.split_points()
  for start, stop in zip(points[:-1], points[1:]):
    prefix = tuple(start.split("/"))
    n_bn = sum(path[:len(prefix)] == prefix for path in stats) // 2  # mean and var per layer

    def moments(v, x, start=start, stop=stop):
      with nn.intercept_methods(_sow_bn_input_moments):
        _, state = model.apply(v, x, start=start, stop=stop, mutable=[_MOMENTS])
      return state[_MOMENTS]

    moments = jax.jit(moments)
    for _ in range(n_bn):
      v = {**variables, "batch_stats": flax.traverse_util.unflatten_dict(stats)}
      totals: dict[tuple[str, ...], Any] = {}
      for x in inputs:
        for path, ((count, mean, m2),) in flax.traverse_util.flatten_dict(moments(v, x)).items():
          totals[path] = _merge(totals.get(path), int(count), mean, m2)
      for path, (count, mean, m2) in totals.items():
        layer = path[:-1]  # drop the sown leaf name
        stats[layer + ("mean",)] = jnp.asarray(mean, jnp.float32)
        stats[layer + ("var",)] = jnp.asarray(m2 / count, jnp.float32)
    if stop != points[-1]:
      v = {**variables, "batch_stats": flax.traverse_util.unflatten_dict(stats)}
      forward = jax.jit(lambda v, x, start=start, stop=stop: model.apply(v, x, start=start, stop=stop))
      inputs = [forward(v, x) for x in inputs]
  return {**variables, "batch_stats": flax.traverse_util.unflatten_dict(stats)}
