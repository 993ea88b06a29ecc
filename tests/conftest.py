"""Shared pytest setup: CPU only, float32 matmuls at full precision, single-threaded BLAS (as the entry
points run it, `lqf.parallel.single_threaded_blas`)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402  (after the environment is set)

from lqf import parallel  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
parallel.single_threaded_blas()
