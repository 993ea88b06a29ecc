"""Shared pytest setup: CPU only, single-threaded BLAS (as the entry points run it,
`lqf.runtime.parallel.single_threaded_blas`), one persistent compilation cache per session.

No global matmul precision: the library sets Precision.HIGHEST itself where a result is certified or
compared with an exact quantity (`lqf.precision`), and test_precision.py checks that it does."""

import atexit
import os
import shutil
import subprocess
import tempfile

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent compilation cache for the session, shared with the subprocesses the tests start: many
# tests compile the same programs (a tiny pretraining step, a tail's jvp). Deleted at exit.
_CACHE = tempfile.mkdtemp(prefix="lqf-tests-jax-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402  (after the environment is set)
import jax.numpy as jnp  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import support  # noqa: E402
from lqf.precision import exact  # noqa: E402
from lqf.runtime import parallel  # noqa: E402

parallel.single_threaded_blas()


@pytest.fixture(scope="session")
def dense_jacobian():
  """``jacobian(lin, variables, h) -> (J, unravel)``: the linearized model's Jacobian J (N·C, P) in
  float64 (row (i, c) = i·C + c, columns in `ravel_pytree` order of δ, ``unravel`` maps a column
  vector back to δ), by ``jax.jacrev`` (N·C vjps, fewer than P jvps) with full float32 products on every
  backend."""
  @exact
  def jacobian(lin, variables, h):
    w0, unravel = ravel_pytree(lin.init_delta(variables))
    jac = jax.jit(jax.jacrev(lambda d: lin.apply(unravel(d), variables, h).reshape(-1)))(w0)
    return np.asarray(jac, np.float64), unravel
  return jacobian


@pytest.fixture(scope="session")
def six_examples(dense_jacobian):
  """`support.linearized_problem` on 6 images labelled `support.SIX_LABELS`: (lin, variables, features,
  labels, J, unravel)."""
  lin, variables, features, jac, unravel = support.linearized_problem(dense_jacobian, 6)
  return lin, variables, features, jnp.asarray(support.SIX_LABELS), jac, unravel


@pytest.fixture(scope="session")
def nine_examples(dense_jacobian):
  """`support.linearized_problem` on 9 images (3 per class, `support.NINE_LABELS`): (lin, variables,
  features, J)."""
  return support.linearized_problem(dense_jacobian, 9)[:4]


@pytest.fixture(scope="session")
def uninterrupted_pretraining(tmp_path_factory):
  """The workdir of an uninterrupted `support.STEPS`-step tiny pretraining run, the reference of the
  resume tests (test_resume.py, test_interrupt.py) that stop the same command and rerun it."""
  workdir = str(tmp_path_factory.mktemp("uninterrupted") / "run")
  out = subprocess.run(support.pretrain_command(support.STEPS, support.CHECKPOINT_EVERY, f"--workdir={workdir}"),
                       env=support.pretrain_env(), cwd=support.ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir
