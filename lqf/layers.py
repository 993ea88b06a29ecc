"""The trainable layers of a network as the curvature models see them (`lqf.kfac`, `lqf.ntk`).

`find_layers` traces the network once on one example and lists the layers that own trainable
parameters: a Kronecker layer (``nn.Dense``, ``nn.Conv``) with its input rows a_t and the output
gradients g_ct = ∂f_c/∂s_t of its pre-activation s at its T output positions, or a diagonal layer
(``nn.BatchNorm`` scale/bias) with the per-example gradients ∂f_c/∂θ. `per_example_quantities`
computes them for one example, by tapping s ← s + p at each layer's output (∂f/∂p = ∂f/∂s) under
``nn.intercept_methods``. For a convolution, a_t is the im2col patch of output position t in the row
order of the HWIO kernel reshaped to (kh·kw·cin, out), so Σ_t a_t g_ctᵀ is the kernel's gradient.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.linen.linear import canonicalize_padding

from lqf.linearize import replace


@dataclasses.dataclass(frozen=True)
class Layer:
  """A trainable layer of the network as K-FAC sees it (static, hashable)."""
  name: str
  kind: str                                 # "kronecker" (Dense/Conv) or "diagonal" (BatchNorm)
  leaves: tuple[str, ...]                   # trainable leaves, e.g. ("kernel", "bias")
  in_dim: int = 0                           # width of the rows a_t (kernel rows + 1 for a bias)
  out_shape: tuple[int, ...] = ()           # shape of s for one example (1, ..., out)
  conv: tuple | None = None                 # (kernel_size, strides, padding, lhs_dil, rhs_dil)


def _conv_geometry(module: nn.Conv, name: str) -> tuple:
  """The patch-extraction parameters of an ``nn.Conv``; an error for what im2col here cannot mirror."""
  kernel_size = tuple(module.kernel_size)
  padding = canonicalize_padding(module.padding, len(kernel_size))
  if module.feature_group_count != 1 or module.mask is not None or padding in ("CIRCULAR", "REFLECT",
                                                                                  "CAUSAL"):
    raise ValueError(f"layer {name!r}: K-FAC supports plain convolutions (feature_group_count=1, "
                     f"no mask, zero padding), got feature_group_count={module.feature_group_count}, "
                     f"padding={module.padding!r}: exclude it from the trainable regex.")
  rep = lambda v: (1,) * len(kernel_size) if v is None else (  # noqa: E731
      (v,) * len(kernel_size) if isinstance(v, int) else tuple(v))
  pad = padding if isinstance(padding, str) else tuple(tuple(p) for p in padding)
  return (kernel_size, rep(module.strides), pad, rep(module.input_dilation),
          rep(module.kernel_dilation))


def find_layers(apply_fn: Callable, variables: dict, x1: jnp.ndarray,
                 trainable: frozenset[str]) -> tuple[Layer, ...]:
  """Traces ``apply_fn`` on one example and returns the layers that own trainable parameters."""
  layers: dict[str, Layer] = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.Conv, nn.BatchNorm)):
      return out
    name = "/".join(module.path)
    leaves = tuple(l for l in ("kernel", "bias", "scale") if f"{name}/{l}" in trainable)
    if not leaves:
      return out
    if name in layers:
      raise ValueError(f"layer {name!r} is applied more than once (shared weights): K-FAC cannot "
                       f"precondition it; exclude it from the trainable regex.")
    if isinstance(module, nn.BatchNorm):
      layers[name] = Layer(name, "diagonal", leaves)
    else:
      conv = _conv_geometry(module, name) if isinstance(module, nn.Conv) else None
      rows = args[0].shape[-1] * (int(np.prod(conv[0])) if conv else 1) if "kernel" in leaves else 0
      layers[name] = Layer(name, "kronecker", leaves, rows + ("bias" in leaves), tuple(out.shape), conv)
    return out

  with nn.intercept_methods(interceptor):  # a fresh function: eval_shape caches traces by function
    jax.eval_shape(lambda v, x: apply_fn(v, x), variables, x1)
  covered = {f"{l.name}/{leaf}" for l in layers.values() for leaf in l.leaves}
  missing = sorted(trainable - covered)
  if missing:
    raise ValueError(f"trainable parameter {missing[0]!r} is not the kernel/bias of an nn.Dense/nn.Conv "
                     f"nor the scale/bias of an nn.BatchNorm applied by the model: K-FAC cannot "
                     f"precondition it; exclude it from the trainable regex.")
  return tuple(layers.values())


def _apply_tapped(apply_fn: Callable, variables: dict, x: jnp.ndarray,
                  perturbations: dict[str, jnp.ndarray]) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """Runs ``apply_fn`` with s ← s + perturbations[name] at each named Dense/Conv output.

  Returns the logits and each named layer's input, so that ∂f/∂perturbation = ∂f/∂s.
  """
  inputs = {}

  def interceptor(next_fun, args, kwargs, context):
    name = "/".join(context.module.path)
    if context.method_name != "__call__" or name not in perturbations or not isinstance(
        context.module, (nn.Dense, nn.Conv)):
      return next_fun(*args, **kwargs)
    inputs[name] = args[0]
    return next_fun(*args, **kwargs) + perturbations[name]

  with nn.intercept_methods(interceptor):
    logits = apply_fn(variables, x)
  return logits, inputs


def _layer_inputs(layer: Layer, x: jnp.ndarray) -> jnp.ndarray:
  """The rows a_t of one example's layer input x (1, ..., d): (T, d_in) [+ a column of ones for a bias].

  For a convolution a_t is the im2col patch of output position t, ordered like the rows of the HWIO
  kernel reshaped to (kh·kw·cin, out).
  """
  rows = []
  if "kernel" in layer.leaves:
    if layer.conv is None:
      rows.append(x.reshape(-1, x.shape[-1]))
    else:
      kernel_size, strides, padding, lhs_dil, rhs_dil = layer.conv
      nd = len(kernel_size)
      spec = (0, nd + 1, *range(1, nd + 1))
      numbers = jax.lax.ConvDimensionNumbers(spec, (nd + 1, nd, *range(nd)), spec)
      p = jax.lax.conv_general_dilated_patches(
          x.astype(jnp.float32), kernel_size, strides, padding, lhs_dil, rhs_dil, numbers,
          precision=jax.lax.Precision.HIGHEST)                       # (1, *out_spatial, cin·prod(k))
      cin = x.shape[-1]
      p = p.reshape(-1, cin, int(np.prod(kernel_size)))              # channel-major patch features
      rows.append(jnp.swapaxes(p, 1, 2).reshape(p.shape[0], -1))     # -> (T, prod(k)·cin), HWIO order
  if "bias" in layer.leaves:
    t = int(np.prod(layer.out_shape[1:-1]))
    rows.append(jnp.ones((rows[0].shape[0] if rows else t, 1), jnp.float32))
  return jnp.concatenate(rows, axis=1).astype(jnp.float32)


def per_example_quantities(apply_fn: Callable, variables: dict, layers: tuple[Layer, ...], x: jnp.ndarray,
                 directions: jnp.ndarray):
  """One example's layer quantities for output directions v (V, C) (rows of I for exact G).

  Returns:
    a: Kronecker layer -> its input rows a_t (T, d_in) (`_layer_inputs`);
    g: Kronecker layer -> output gradients ∂(vᵀf)/∂s_t (V, T, out);
    g_diag: diagonal leaf path -> ∂(vᵀf)/∂θ (V, *leaf_shape).
  """
  kron = [l for l in layers if l.kind == "kronecker"]
  flat_params = traverse_util.flatten_dict(variables["params"], sep="/")
  diag0 = {f"{l.name}/{leaf}": flat_params[f"{l.name}/{leaf}"]
           for l in layers if l.kind == "diagonal" for leaf in l.leaves}
  pert0 = {l.name: jnp.zeros(l.out_shape, jnp.float32) for l in kron}

  def f(diag, pert):
    params = replace(variables["params"], traverse_util.unflatten_dict(diag, sep="/"))
    logits, ins = _apply_tapped(apply_fn, {**variables, "params": params}, x[None], pert)
    return logits[0].astype(jnp.float32), ins

  _, vjp_fn, ins = jax.vjp(f, diag0, pert0, has_aux=True)
  g_diag, g_pert = jax.vmap(vjp_fn)(directions)
  a = {l.name: _layer_inputs(l, ins[l.name]) for l in kron}
  g = {l.name: g_pert[l.name].reshape(len(directions), -1, l.out_shape[-1]) for l in kron}
  return a, g, g_diag


def num_outputs(apply_fn: Callable, variables: dict, inputs: jnp.ndarray) -> int:
  return jax.eval_shape(lambda v, x: apply_fn(v, x), variables, inputs[:1]).shape[-1]
