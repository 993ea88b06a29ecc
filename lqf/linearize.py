"""Linearization of a network around its pretrained weights w0 (the "L" of LQF).

The parameters are split into a frozen trunk and a trainable tail by a regex over parameter paths
(``trainable_mask``). The offset δ = w − w0 of the trainable parameters is the variable:

  f_lin(x; δ) = f(x; w0) + J(x)·δ,   J(x) = ∂f(x; w)/∂w_train at w0,

computed with ``jax.jvp`` of the tail around w0_train, starting from the trunk features
h(x) = trunk(x; w0): the input of the first split point that holds a trainable parameter, when the model
declares split points (`lqf.network`: any Flax Linen or NNX module, or a plain function, is a model), else
the input x itself (the whole network is the tail).
BatchNorm always runs in inference mode with the pretrained running statistics, so the network is an
exact function of its parameters and h(x), f(x; w0) are constants per example: compute them once
(`Linearized.features`) and a training step only costs a jvp through the tail (+ its transpose).

w0 (``variables``) is always an argument of the functions here, never a closure constant, so they can
be jitted without XLA constant-folding the network.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import traverse_util

from lqf import inference
from lqf import network

Params = Any  # a nested dict of arrays (Flax parameters or a trainable subset of them)


def trainable_mask(params: Params, trainable: str) -> Params:
  """Marks the parameters whose '/'-joined path matches the regex ``trainable`` (``re.search``).

  Args:
    params: Flax parameters (nested dict).
    trainable: a regex such as ``^(stage3|head)/``; ``"all"`` (or ``".*"``) selects everything.

  Returns:
    A pytree of bools with the structure of ``params``.
  """
  pattern = re.compile(".*" if trainable == "all" else trainable)
  flat = traverse_util.flatten_dict(params, sep="/")
  mask = {k: bool(pattern.search(k)) for k in flat}
  if not any(mask.values()):
    raise ValueError(f"trainable={trainable!r} matches no parameter: use a regex over paths such as "
                     f"{list(flat)[:3]} (e.g. '^(stage3|head)/') or 'all'.")
  return traverse_util.unflatten_dict(mask, sep="/")


def select(params: Params, paths: tuple[str, ...]) -> Params:
  """The sub-tree of ``params`` holding the leaves at ``paths``."""
  flat = traverse_util.flatten_dict(params, sep="/")
  return traverse_util.unflatten_dict({k: flat[k] for k in paths}, sep="/")


def replace(params: Params, subset: Params) -> Params:
  """``params`` with the leaves present in ``subset`` replaced by ``subset``'s."""
  flat = dict(traverse_util.flatten_dict(params, sep="/"))
  flat.update(traverse_util.flatten_dict(subset, sep="/"))
  return traverse_util.unflatten_dict(flat, sep="/")


def split_batches(x: Any, batch_size: int) -> tuple[Any, jnp.ndarray]:
  """Pads the leading axis of every leaf of ``x`` (N, ...) to a multiple of ``batch_size`` and splits it.

  Returns:
    (xs, mask): leaves reshaped to (num_batches, batch_size, ...) with zero padding, and a float32
    mask (num_batches, batch_size) that is 1 for real examples and 0 for padding.
  """
  n = jax.tree.leaves(x)[0].shape[0]
  num_batches = -(-n // batch_size)
  pad = num_batches * batch_size - n

  def split(a):
    a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
    return a.reshape(num_batches, batch_size, *a.shape[1:])

  mask = (jnp.arange(num_batches * batch_size) < n).astype(jnp.float32)
  return jax.tree.map(split, x), mask.reshape(num_batches, batch_size)


class Features(NamedTuple):
  """Cached per-example constants of the linearization.

  Attributes:
    h: trunk features, the input of the split point (N, ...) (the images themselves for 'all').
    f0: logits of the pretrained network f(x; w0) (N, C).
  """
  h: jnp.ndarray
  f0: jnp.ndarray


@dataclasses.dataclass(frozen=True)
class Tail:
  """The network from ``split`` on, as a value: ``tail(variables, h)`` -> logits (B, C).

  Equal for equal models and split points, unlike a bound method (which compares its instance by
  identity): the jitted functions that take it as a static argument (`lqf.kfac`, `lqf.nystrom`,
  `lqf.ntk`) compile once for all the tasks of a sweep with the same shapes, not once per task.
  """
  model: network.Model
  split: str | None

  def __call__(self, variables: dict, h: jnp.ndarray) -> jnp.ndarray:
    if self.split is None:
      return self.model.apply(variables, h)
    return self.model.apply(variables, h, start=self.split)


@dataclasses.dataclass(frozen=True)
class Linearized:
  """A network linearized in its trainable tail around w0 (build it with `linearize`).

  Attributes:
    model: the network (`lqf.network.Model`).
    split: the split point where the tail starts (its input is the cached feature h); None: the whole
      network is the tail (h = the input).
    trainable_paths: '/'-joined paths of the trainable parameters (the leaves of δ), selected by the
      ``trainable`` regex.
  """
  model: network.Model
  split: str | None
  trainable_paths: tuple[str, ...]

  def trunk(self, variables: dict, images: jnp.ndarray) -> jnp.ndarray:
    """h(x) = trunk(x; w0): inputs (B, ...) -> the input of the split point (the inputs for None)."""
    if self.split is None:
      return images
    return self.model.apply(variables, images, stop=self.split)

  @property
  def tail(self) -> Tail:
    """The network from the split point on (BatchNorm in inference mode): (w0, h) -> logits (B, C)."""
    return Tail(self.model, self.split)

  def tail_fn(self, variables: dict, h: jnp.ndarray) -> Callable[[Params], jnp.ndarray]:
    """The function w_train ↦ tail(h) (B, C), the other parameters at w0."""
    return lambda w: self.tail({**variables, "params": replace(variables["params"], w)}, h)

  def features(self, variables: dict, images: jnp.ndarray,
               batch_size: int = inference.EVAL_BATCH_SIZE) -> Features:
    """The cached features (h, f0) of a dataset, ``batch_size`` images per forward pass.

    Args:
      variables: the pretrained variables w0 ({'params', 'batch_stats'}).
      images: (N, H, W, C).
      batch_size: images per jitted pass (`lqf.inference.apply_batched`).
    """
    h = self.trunk_features(variables, images, batch_size)
    return Features(h, inference.apply_batched(jit_tail, h, args=(self, variables), batch_size=batch_size))

  def trunk_features(self, variables: dict, images: jnp.ndarray,
                     batch_size: int = inference.EVAL_BATCH_SIZE) -> jnp.ndarray:
    """h(x) (N, ...) of a dataset (the images themselves when everything trains)."""
    return inference.apply_batched(jit_trunk, images, args=(self, variables), batch_size=batch_size)

  def init_delta(self, variables: dict) -> Params:
    """δ = 0, a pytree shaped like the trainable parameters."""
    return jax.tree.map(jnp.zeros_like, select(variables["params"], self.trainable_paths))

  def apply(self, delta: Params, variables: dict, h: jnp.ndarray) -> jnp.ndarray:
    """f_lin(x; δ) = f(x; w0) + J(x)·δ (B, C) from trunk features h, by ``jax.jvp`` of the tail."""
    w0 = select(variables["params"], self.trainable_paths)
    f0, jvp = jax.jvp(self.tail_fn(variables, h), (w0,), (delta,))
    return f0 + jvp

  def apply_images(self, delta: Params, variables: dict, images: jnp.ndarray) -> jnp.ndarray:
    """f_lin(x; δ) from raw images (B, H, W, C): the trunk runs too (augmentation path)."""
    return self.apply(delta, variables, self.trunk(variables, images))

  def tangent(self, variables: dict, h: jnp.ndarray) -> tuple[jnp.ndarray, Callable[[Params], Any]]:
    """Linearizes the tail once: returns (f0, jvp) with f0 = f(x; w0) (B, C) and jvp(δ) = J(x)·δ.

    ``jvp`` is the ``jax.linearize`` map: a ``jax.tree_util.Partial`` whose leaves hold the tail's
    linearization residuals at w0 (activations, BatchNorm multipliers, activation slopes), so it can be
    passed to jitted functions as an argument and evaluating it does not recompute the forward pass.
    ``jax.linear_transpose(jvp, delta)`` gives δ ↦ Jᵀ·r. Memory: a few activations of the tail per
    example, so use it on the whole dataset only when that fits (e.g. few-shot problems).
    """
    return jax.linearize(self.tail_fn(variables, h), select(variables["params"],
                                                                        self.trainable_paths))

  def merge(self, variables: dict, delta: Params) -> dict:
    """The variables w0 + δ, to evaluate the nonlinear network at the fine-tuned weights."""
    w = jax.tree.map(jnp.add, select(variables["params"], self.trainable_paths), delta)
    return {**variables, "params": replace(variables["params"], w)}


def linearize(model: network.Model, variables: dict, trainable: str) -> Linearized:
  """Linearizes ``model`` around ``variables`` in the parameters matching the regex ``trainable``.

  With split points (`lqf.network.split_points`) the tail starts at the first point that holds a trainable
  parameter and everything before it is the frozen trunk; without them, or when a trainable parameter lies
  under no point, the whole network is the tail. Parameters of the tail that do not match stay at w0.

  Args:
    model: a `lqf.network.Model`: a Flax Linen module (e.g. `lqf.models.ResNet`), or `lqf.network.from_nnx` /
      `lqf.network.from_function` of an NNX module or a plain function.
    variables: the pretrained variables w0 ({'params': ..., and e.g. 'batch_stats': ...}).
    trainable: regex over '/'-joined parameter paths (see `trainable_mask`), or 'all'.
  """
  mask = traverse_util.flatten_dict(trainable_mask(variables["params"], trainable), sep="/")
  paths = tuple(k for k, m in mask.items() if m)
  points = network.split_points(model)
  point_of = [next((i for i, p in enumerate(points) if k.startswith(p + "/")), None) for k in paths]
  split = None if None in point_of else points[min(point_of)]
  return Linearized(model=model, split=split, trainable_paths=paths)


# The methods jitted once at module level, with the (hashable) `Linearized` static.
jit_trunk = jax.jit(Linearized.trunk, static_argnums=0)
jit_tail = jax.jit(lambda lin, variables, h: lin.tail(variables, h), static_argnums=0)
jit_tangent = jax.jit(Linearized.tangent, static_argnums=0)
