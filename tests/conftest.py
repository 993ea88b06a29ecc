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
# The suite is compile-bound: compile without LLVM optimisations, as the subprocess runs do
# (`support.pretrain_env`) and as `lqf.train.init_variables` compiles its initializers (in-process tests
# ~30 % faster; XLA enables no fast-math at either level, so results agree to float32 rounding). Inherited by
# the subprocesses the tests start; an XLA_FLAGS that already sets the level wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402  (after the environment is set)
import jax.numpy as jnp  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import support  # noqa: E402
from lqf.precision import exact  # noqa: E402
from lqf.runtime import parallel  # noqa: E402

parallel.single_threaded_blas()

# The files that take longest (measured on 2 cores under `-n 2`), slowest first. Collected first, they are
# handed out first (setup.cfg: `--dist loadfile --no-loadscope-reorder`), so that no worker starts a
# minute-long file while the other runs out of work: longest-first scheduling. The other files follow in
# their usual order.
SLOW_FILES = ("test_forget.py", "test_update_studies.py", "test_interrupt.py", "test_finetune_resume.py",
              "test_distributed.py", "test_mislabel.py", "test_finetune_large.py", "test_update_text.py",
              "test_text_models.py", "test_bad_input.py", "test_update_lqf.py", "test_finetune.py",
              "test_your_model.py", "test_stability.py", "test_compare.py", "test_task_arithmetic.py",
              "test_influence.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOW_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable: test order kept


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
  resume tests (test_interrupt.py) that stop the same command and rerun it."""
  workdir = str(tmp_path_factory.mktemp("uninterrupted") / "run")
  out = subprocess.run(support.pretrain_command(support.STEPS, support.CHECKPOINT_EVERY, f"--workdir={workdir}"),
                       env=support.pretrain_env(), cwd=support.ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir
