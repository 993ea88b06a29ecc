"""What LQF needs of a model: a protocol, not a class.

A *model* is any hashable object with ``model.apply(variables, x) -> logits (B, C)`` that runs the network as
at test time (BatchNorm with its running statistics, dropout off), with ``variables['params']`` the nested
dict of its parameters (other collections, e.g. ``batch_stats``, stay fixed). A Flax Linen module is one
(its ``apply``; the ResNets, the ViT and the text models of `lqf.models` run in inference mode with their
default ``train=False``). Two adapters make the others one:

* `from_function`: a plain ``apply_fn(variables, x)`` (e.g. ``lambda v, x: model.apply(v, x,
  deterministic=True)`` for a Linen module that needs arguments for inference mode);
* `from_nnx`: a Flax NNX module (``nnx.split``: its ``nnx.Param`` state becomes ``variables['params']``,
  everything else ``variables['state']``), in evaluation mode (``.eval()`` on a copy).

Split points (optional). A model that declares them — ``model.split_points()``, the names of points in
forward order, with ``model.apply(variables, x, stop=p)`` returning the input of point p and
``model.apply(variables, h, start=p)`` continuing from it — lets `lqf.linearize.linearize` compute the frozen
trunk before the trainable tail once per example (h) and run only the tail at each step. Every parameter
must then live under one point's module (path ``p/...``). Without split points the whole forward pass is the
tail (h = x: correct, slower per step). To add them to your own Linen module, see ``lqf/models/vit.py``: a
``split_points`` method and ``start`` / ``stop`` keywords that skip the points outside [start, stop).

The embedding (optional, for the ridge-fitted head of a new task, `lqf.heads`): ``model.apply(variables, x,
return_embedding=True)`` returns (logits, the head's input (B, D)); the head's parameters live under
``head``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence

import jax
from flax import nnx


class Model(Protocol):
  """The protocol (module docstring); ``split_points`` is optional."""

  def apply(self, variables: dict, x: jax.Array, **kwargs) -> jax.Array: ...


def split_points(model: Model) -> tuple[str, ...]:
  """The split points ``model`` declares, in forward order (() when it declares none)."""
  points = getattr(model, "split_points", None)
  return tuple(points()) if callable(points) else ()


def points_between(points: Sequence[str], start: str | None, stop: str | None) -> list[str]:
  """The split points a model's forward pass runs from ``start`` (None: its input) up to, excluding,
  ``stop`` (None: to the end); for a model's ``__call__`` (`lqf.models.ResNet`, `lqf.models.ViT`)."""
  for p in (start, stop):
    if p is not None and p not in points:
      raise ValueError(f"split point {p!r} is unknown: use one of {list(points)}.")
  return list(points[points.index(start) if start else 0:points.index(stop) if stop else len(points)])


@dataclasses.dataclass(frozen=True)
class Function:
  """A plain function ``apply_fn(variables, x) -> logits`` as a model without split points (`from_function`).

  Equal when the functions are the same object: keep one function per model so jitted programs are reused.
  """
  apply_fn: Callable[[dict, jax.Array], jax.Array]

  def apply(self, variables: dict, x: jax.Array) -> jax.Array:
    return self.apply_fn(variables, x)


def from_function(apply_fn: Callable[[dict, jax.Array], jax.Array]) -> Function:
  """``apply_fn(variables, x) -> logits (B, C)`` (inference mode) as a model; ``variables['params']`` holds
  the parameters it may linearize."""
  return Function(apply_fn)


@dataclasses.dataclass(frozen=True)
class NNX:
  """An NNX module's graph as a model (`from_nnx`): ``apply`` merges the graph with ``variables``.

  Equal for equal graphs (``graphdef``); the state templates only give the structure to fill.
  """
  graphdef: Any
  params: Any = dataclasses.field(compare=False, repr=False)
  state: Any = dataclasses.field(compare=False, repr=False)

  def apply(self, variables: dict, x: jax.Array) -> jax.Array:
    params = jax.tree.map(lambda a: a, self.params)  # a new State of the same structure
    state = jax.tree.map(lambda a: a, self.state)
    nnx.replace_by_pure_dict(params, variables["params"])
    nnx.replace_by_pure_dict(state, variables["state"])
    return nnx.merge(self.graphdef, params, state)(x)


def from_nnx(module: nnx.Module) -> tuple[NNX, dict]:
  """(model, variables) of an NNX ``module`` in evaluation mode (a copy's ``.eval()``: dropout off, BatchNorm
  on its running statistics); ``variables = {'params': the nnx.Param values, 'state': the rest}`` as
  nested dicts (``State.to_pure_dict``)."""
  module = nnx.clone(module)
  module.eval()
  graphdef, params, state = nnx.split(module, nnx.Param, ...)
  return NNX(graphdef, params, state), {"params": params.to_pure_dict(), "state": state.to_pure_dict()}

