"""The trainable layers of a network as the curvature models see them (`lqf.kfac`, `lqf.ntk`).

`find_layers` traces the network once on one example and lists the layers that own trainable
parameters: a Kronecker layer with its input rows a_t and the output gradients g_ct = ∂f_c/∂s_t of its
pre-activation s at its T output positions, or a diagonal block with the per-example gradients ∂f_c/∂θ.
`per_example_quantities` computes them for one example, by tapping s ← s + p at each Kronecker layer's
output (∂f/∂p = ∂f/∂s) under ``nn.intercept_methods``. The layer kinds:

* ``nn.Dense`` — on (B, d) inputs T = 1; on token sequences (B, L, d) the L tokens are the positions.
* ``nn.DenseGeneral`` contracting its input's trailing axes (the q/k/v and output projections of
  ``nn.MultiHeadDotProductAttention``): the kernel is the matrix (prod(contracted dims), prod(features)),
  a_t the flattened contracted axes, s_t the flattened features, the other axes the positions.
* ``nn.Conv``: a_t is the im2col patch of output position t in the row order of the HWIO kernel reshaped
  to (kh·kw·cin, out), so Σ_t a_t g_ctᵀ is the kernel's gradient.
* ``nn.BatchNorm`` scale/bias: diagonal blocks (documented in `lqf.kfac`).
* anything else — LayerNorm, embeddings, a position embedding declared with ``self.param``, any layer of
  an NNX module or a plain function (nothing to intercept there) — falls back to diagonal blocks, named in
  one warning: the exact Gauss-Newton diagonal, like BatchNorm's.

In every Kronecker case Σ_t a_t g_ctᵀ is the gradient of f_c with respect to the kernel matrix (bias row
appended), which the tests check against ``jax.grad``.
"""

from __future__ import annotations

import dataclasses
import warnings
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
  name: str                                 # its module path ('' for a parameter of the top module)
  kind: str                                 # "kronecker" (Dense/DenseGeneral/Conv) or "diagonal"
  leaves: tuple[str, ...]                   # trainable leaves, e.g. ("kernel", "bias")
  in_dim: int = 0                           # width of the rows a_t (kernel rows + 1 for a bias)
  out_shape: tuple[int, ...] = ()           # shape of s for one example (1, ..., *features)
  conv: tuple | None = None                 # (kernel_size, strides, padding, lhs_dil, rhs_dil)
  out_dim: int = 0                          # width of s_t: prod(features)
  in_axes: int = 1                          # trailing input axes a kernel row contracts

  def paths(self) -> tuple[str, ...]:
    """The '/'-joined parameter paths of its trainable leaves."""
    return tuple(f"{self.name}/{leaf}" if self.name else leaf for leaf in self.leaves)

  @property
  def positions(self) -> int:
    """T, the output positions of a Kronecker layer."""
    return int(np.prod(self.out_shape[1:])) // self.out_dim


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


KRONECKER = (nn.Dense, nn.DenseGeneral, nn.Conv)


def _contracted_axes(module: nn.DenseGeneral, ndim: int, name: str) -> int | None:
  """How many trailing input axes a DenseGeneral contracts (None: not trailing, or batch_dims)."""
  axes = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
  axes = sorted(a % ndim for a in axes)
  if module.batch_dims or axes != list(range(ndim - len(axes), ndim)):
    return None
  return len(axes)


def find_layers(apply_fn: Callable, variables: dict, x1: jnp.ndarray,
                trainable: frozenset[str]) -> tuple[Layer, ...]:
  """Traces ``apply_fn`` on one example and returns the layers that own trainable parameters; trainable
  parameters of no supported layer get diagonal blocks, named in one warning (module docstring)."""
  layers: dict[str, Layer] = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, (*KRONECKER, nn.BatchNorm)):
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
      return out
    in_axes, out_dim = 1, out.shape[-1]
    if isinstance(module, nn.DenseGeneral):
      in_axes = _contracted_axes(module, args[0].ndim, name)
      if in_axes is None:
        return out  # not a matrix over trailing axes: the diagonal fallback
      features = (module.features,) if isinstance(module.features, int) else tuple(module.features)
      out_dim = int(np.prod(features))
    conv = _conv_geometry(module, name) if isinstance(module, nn.Conv) else None
    rows = int(np.prod(args[0].shape[-in_axes:])) * (int(np.prod(conv[0])) if conv else 1)
    rows = rows if "kernel" in leaves else 0
    layers[name] = Layer(name, "kronecker", leaves, rows + ("bias" in leaves), tuple(out.shape), conv,
                         out_dim, in_axes)
    return out

  with nn.intercept_methods(interceptor):  # a fresh function: eval_shape caches traces by function
    jax.eval_shape(lambda v, x: apply_fn(v, x), variables, x1)
  covered = {path for l in layers.values() for path in l.paths()}
  missing = sorted(trainable - covered)
  if missing:
    warnings.warn(f"K-FAC has no Kronecker factors for {len(missing)} trainable parameters of no "
                  f"Dense/DenseGeneral/Conv/BatchNorm layer (e.g. {missing[0]!r}): diagonal Gauss-Newton "
                  "blocks instead (lqf.layers).", stacklevel=2)
    for path in missing:
      parent, _, leaf = path.rpartition("/")
      layers[path] = Layer(parent, "diagonal", (leaf,))
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
        context.module, KRONECKER):
      return next_fun(*args, **kwargs)
    inputs[name] = args[0]
    return next_fun(*args, **kwargs) + perturbations[name]

  with nn.intercept_methods(interceptor):
    logits = apply_fn(variables, x)
  return logits, inputs


def _layer_inputs(layer: Layer, x: jnp.ndarray) -> jnp.ndarray:
  """The rows a_t of one example's layer input x (1, ...): (T, d_in) [+ a column of ones for a bias].

  For a convolution a_t is the im2col patch of output position t, ordered like the rows of the HWIO
  kernel reshaped to (kh·kw·cin, out).
  """
  rows = []
  if "kernel" in layer.leaves:
    if layer.conv is None:
      rows.append(x.reshape(-1, int(np.prod(x.shape[-layer.in_axes:]))))
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
    rows.append(jnp.ones((rows[0].shape[0] if rows else layer.positions, 1), jnp.float32))
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
  diag0 = {path: flat_params[path] for l in layers if l.kind == "diagonal" for path in l.paths()}
  pert0 = {l.name: jnp.zeros(l.out_shape, jnp.float32) for l in kron}

  def f(diag, pert):
    params = replace(variables["params"], traverse_util.unflatten_dict(diag, sep="/"))
    logits, ins = _apply_tapped(apply_fn, {**variables, "params": params}, x[None], pert)
    return logits[0].astype(jnp.float32), ins

  _, vjp_fn, ins = jax.vjp(f, diag0, pert0, has_aux=True)
  g_diag, g_pert = jax.vmap(vjp_fn)(directions)
  a = {l.name: _layer_inputs(l, ins[l.name]) for l in kron}
  g = {l.name: g_pert[l.name].reshape(len(directions), -1, l.out_dim) for l in kron}
  return a, g, g_diag


def num_outputs(apply_fn: Callable, variables: dict, inputs: jnp.ndarray) -> int:
  return jax.eval_shape(lambda v, x: apply_fn(v, x), variables, inputs[:1]).shape[-1]
