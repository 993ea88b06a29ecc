"""Full float32 matrix products for every computation that is certified or compared with an exact one.

XLA's default precision for a float32 matrix product or convolution depends on the backend: float32 on
CPU, TensorFloat-32 on NVIDIA GPUs since Ampere (inputs rounded to a 10-bit mantissa, relative error
≈ 2⁻¹¹ ≈ 5e-4 per product), one bfloat16 pass on TPUs (8-bit mantissa, ≈ 2⁻⁸ ≈ 4e-3). A relative
residual ‖b − Hδ‖/‖b‖ computed with such products measures their rounding, not δ: a certificate of
1e-4 cannot be computed from products accurate to 5e-4, and conjugate gradient on such products stalls
near their error.

`exact` runs a function with ``jax.default_matmul_precision('highest')``: every ``dot_general`` and
``conv_general_dilated`` that JAX *traces* inside it carries ``Precision.HIGHEST`` (float32 on CPU and
GPU, six bfloat16 passes on TPU), whatever the global ``jax_default_matmul_precision`` is. Precision is
fixed when a function is traced, and the setting is part of ``jax.jit``'s cache key, so a jitted
function called inside `exact` compiles its own exact version beside the fast one, and a ``jax.linearize``
map traced inside it stays exact wherever it is evaluated. Closures that a decorated function returns
are traced later, by their caller: wrap them with `exact` too (`lqf.solve.normal_equations` does).

What is exact (decorated in the library): the normal-equation products, the conjugate-gradient solves
and their certificates (`lqf.solve`), forgetting (`lqf.forget`), the empirical NTK behind leave-one-out,
influence and mislabel scores (`lqf.influence`), the K-FAC factors, their inverses and the NTK
approximation (`lqf.kfac`), the Nyström sketch (`lqf.nystrom`), λmax by power iteration
(`lqf.stability`) and the task-arithmetic logits (`lqf.task_arithmetic`). What keeps the platform's
default (fast) precision: the trunk features, the steps of the early-stopped fits (`lqf.fit`),
nonlinear fine-tuning and pretraining, whose results nothing certifies.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import jax

EXACT = "highest"  # the jax_default_matmul_precision that `exact` sets
F = TypeVar("F", bound=Callable)


def exact(fn: F) -> F:
  """``fn`` run with every float32 matrix product and convolution it traces at ``Precision.HIGHEST``."""
  @functools.wraps(fn)
  def run_exact(*args, **kwargs):
    with jax.default_matmul_precision(EXACT):
      return fn(*args, **kwargs)
  return run_exact
