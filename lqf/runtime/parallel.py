"""Data parallelism: one mesh axis over every device of every process, jit with shardings.

Batches are sharded along the ``"data"`` axis and parameters/optimizer state are replicated; XLA inserts
the gradient all-reduce. The same code runs on one CPU, on 8 fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``), on a GPU and on a multi-host TPU pod, where every
host runs the same command and `initialize_distributed` connects them first. No ``jax.pmap``.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import threadpoolctl
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
DISTRIBUTED_ENV = "LQF_DISTRIBUTED"


def single_threaded_blas() -> None:
  """Runs OpenBLAS (numpy's, and scipy's that XLA's CPU LAPACK calls use) single-threaded from now on.

  The eigendecompositions and inverses of small matrices here (K-FAC factors, the Nyström sketch's
  ℓ × ℓ matrices, the kernel preconditioner) are too small for threads, and OpenBLAS threads that
  spin next to XLA's own on a small CPU slow them down by an order of magnitude (`bench/RESULTS.md`).
  The entry points
  (`lqf.runtime.cli`) call it.
  """
  threadpoolctl.threadpool_limits(limits=1, user_api="blas")


def initialize_distributed(enabled: bool | None = None) -> None:
  """Calls ``jax.distributed.initialize()`` when asked, before any device is touched.

  Asked means ``enabled=True`` (e.g. ``config.distributed``) or the environment variable
  ``LQF_DISTRIBUTED=1``. On Cloud TPU pods and SLURM/GPU clusters JAX discovers the coordinator by
  itself; elsewhere set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
  (read here and passed on). Calling it twice is harmless. CPU processes (e.g. two on one machine)
  exchange data through gloo, JAX's default ``jax_cpu_collectives_implementation``.
  """
  if not (enabled or os.environ.get(DISTRIBUTED_ENV) == "1"):
    return
  if jax.distributed.is_initialized():
    return
  kwargs: dict[str, Any] = {}
  if "JAX_COORDINATOR_ADDRESS" in os.environ:
    kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                  process_id=int(os.environ["JAX_PROCESS_ID"]))
  jax.distributed.initialize(**kwargs)


def data_mesh() -> Mesh:
  """A 1-D mesh named ``"data"`` over all devices of all processes, its axis Auto.

  Auto: shardings are placed by XLA's propagation from the jit's ``in_shardings``/``out_shardings``
  (the batch split over ``"data"``, the state replicated), and the traced types carry none. Explicit
  axes (sharding in types, the default of ``jax.make_mesh`` from jax 0.11 on) add nothing to data
  parallelism and refuse constructs whose output sharding the types cannot decide
  (``ShardingTypeError``): the gradient of the integer-label cross-entropy, a scatter-add into a
  batch-sharded operand (jax 0.11.2), and an embedding lookup of batch-sharded token ids, a gather
  (jax 0.10.2).
  """
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the ``"data"`` axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_global_batch(global_batch: int, field: str = "config.batch_size") -> None:
  """Fails before compiling when the device or process count does not divide the global batch."""
  n_dev, n_proc = jax.device_count(), jax.process_count()
  if global_batch <= 0:
    raise ValueError(f"{field}={global_batch} must be positive.")
  if global_batch % n_dev:
    lo, hi = (global_batch // n_dev) * n_dev, (global_batch // n_dev + 1) * n_dev
    raise ValueError(f"{field}={global_batch} is not divisible by the {n_dev} devices: use a multiple of "
                     f"{n_dev} (e.g. {lo or hi} or {hi}).")
  if global_batch % n_proc:
    raise ValueError(f"{field}={global_batch} is not divisible by the {n_proc} processes.")


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles the host-local batches of all processes into global arrays sharded along ``"data"``.

  Every process passes its own rows (``global_batch / process_count`` of them, e.g. from
  `lqf.data.train_iterator`); the global array holds the processes' rows in mesh order.
  """
  sharding = batch_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def shard_global_batch(x: np.ndarray, mesh: Mesh) -> jax.Array:
  """The global array ``x``, held whole by every process, sharded along ``"data"``.

  Each device receives the rows of ``x`` its shard covers (``jax.make_array_from_callback``), so row
  order is kept for any device order and process count (e.g. `lqf.data.eval_batches`, which gives
  every process the whole evaluation batch).
  """
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, batch_sharded(mesh), lambda index: x[index])


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree (parameters, optimizer state) on every device."""
  return jax.device_put(tree, replicated(mesh))


def process_allgather(x: jax.Array) -> np.ndarray:
  """A (possibly multi-host) sharded array as one numpy array on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def apply_stream(fn: Callable[..., Any], batches: Iterable[dict], *, args: tuple = (),
                 mesh: jax.sharding.Mesh | None = None) -> tuple[Any, np.ndarray]:
  """``fn(*args, images)`` over the padded batches {'image', 'label', 'mask'} of `lqf.data.eval_batches`;
  the outputs of the real rows (padding rows dropped; ``fn`` must treat rows independently).

  With ``mesh`` each batch is sharded over it (``fn`` jitted with that sharding) and the outputs are
  gathered from every process.

  Returns:
    (outputs, labels): a pytree of NumPy arrays (N, ...) and the labels (N,) of the real rows.

  Raises:
    ValueError: a batch holds NaN or Inf pixels.
  """
  outputs, labels = [], []
  for i, batch in enumerate(batches):
    if not np.isfinite(batch["image"]).all():
      raise ValueError(f"evaluation batch {i} holds NaN or Inf pixels: check the test data "
                       "(config.data.test_split and its source).")
    keep = np.asarray(batch["mask"]) > 0
    if mesh is None:
      out = jax.tree.map(np.asarray, fn(*args, jnp.asarray(batch["image"])))
    else:
      out = jax.tree.map(process_allgather,
                         fn(*args, shard_global_batch(batch["image"], mesh)))
    outputs.append(jax.tree.map(lambda o: o[keep], out))
    labels.append(np.asarray(batch["label"])[keep])
  return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs), np.concatenate(labels)
