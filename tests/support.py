"""What several test files share: small problems, tiny configs, subprocess runs and their inspection.

Plain helpers, imported as ``from support import …`` (no test module imports another); fixtures are in
conftest.py.
"""

import os
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np

from lqf import fit, losses, train
from lqf import linearize as lin_lib
from lqf.losses import WeightedTargets
from lqf.models import ResNet8
from lqf.runtime import checkpoint as ckpt_lib
from lqf.runtime import config_util
from lqf.runtime.metric_writer import read_metrics

TAIL = "^(stage3|head)/"


def random_variables(model, input_shape, seed=0, dtype=jnp.float32):
  """w0 filled from NumPy (fan-in scaled kernels, random BatchNorm statistics and affine parameters).

  ``jax.eval_shape(model.init)`` + NumPy avoids compiling the initializers (20 s+ on a loaded CPU).
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *input_shape)))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    if name == "kernel":
      value = rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))
    elif name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, s.shape)
    else:  # bias, mean
      value = 0.2 * rng.normal(size=s.shape)
    return jnp.asarray(value, dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def small_problem(dtype=jnp.float32, n=4, num_classes=3, seed=0, negative_slope=0.1):
  """A leaky ResNet8 (width 4) on n random 12×12×1 images: (model, w0, images)."""
  model = ResNet8(num_classes=num_classes, width=4, dtype=dtype, negative_slope=negative_slope)
  x = jnp.asarray(np.random.default_rng(seed + 1).normal(size=(n, 12, 12, 1)), dtype)
  return model, random_variables(model, (12, 12, 1), seed, dtype), x


def random_delta(lin, variables, seed=2):
  """A random offset δ (standard normal leaves)."""
  rng = np.random.default_rng(seed)
  zeros = lin.init_delta(variables)
  return jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), zeros)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(steps=6, batch_size=16):
  """ResNet-8 of width 4 on 8×8 UCI digits 0 and 1 (287 training images): seconds per run."""
  config = config_util.load_sibling(os.path.join(ROOT, "configs", "x.py"), "pretrain_mnist",
                                    f"dataset=uci_digits,classes=0-1,steps={steps}")
  config.data.image_size = 8
  config.model.width = 4
  config.batch_size = config.eval_batch_size = batch_size
  config.log_every = 1
  config.checkpoint_every = 3
  config.eval_every = 1000
  return config


def pretrain_command(steps: int, checkpoint_every: int, *flags: str) -> list[str]:
  """``python -m experiments.pretrain`` with a `tiny_config`-sized run (evaluation once per epoch)."""
  return [sys.executable, "-m", "experiments.pretrain",
          f"--config=configs/pretrain_mnist.py:dataset=uci_digits,classes=0-1,steps={steps}",
          "--config.data.image_size=8", "--config.model.width=4", "--config.batch_size=16",
          "--config.eval_batch_size=16", "--config.log_every=1",
          f"--config.checkpoint_every={checkpoint_every}", *flags]


def pretrain_env(devices: int = 1, **extra: str) -> dict:
  """CPU with ``devices`` fake devices; compiled without LLVM optimisations (several times faster to
  compile; every run compared in a test uses the same flags)."""
  flags = f"--xla_backend_optimization_level=0 --xla_force_host_platform_device_count={devices}"
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, **extra)


class PoisonedIterator(grain.DatasetIterator):
  """A training iterator whose ``at``-th batch (1-based) has every pixel set to ``value``.

  Its state is the real iterator's, so checkpoints hold the real position.
  """

  def __init__(self, iterator: grain.DatasetIterator, at: int, value: float):
    super().__init__(iterator)
    self._at, self._value, self._n = at, value, 0

  def __next__(self):
    batch = next(self._parent)
    self._n += 1
    if self._n == self._at:
      batch = {**batch, "image": np.full_like(batch["image"], self._value)}
    return batch

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


def poison_batches(monkeypatch, at: int, value: float) -> None:
  """Makes `lqf.train.train` read a `PoisonedIterator`."""
  real = train.data_lib.train_iterator
  monkeypatch.setattr(train.data_lib, "train_iterator",
                      lambda *a, **k: PoisonedIterator(real(*a, **k), at, value))


STEPS, CHECKPOINT_EVERY = 120, 10  # the SIGKILL-resume runs (test_resume.py, test_interrupt.py)


def start_pretraining(workdir):
  """A `STEPS`-step tiny pretraining run in ``workdir`` as a subprocess (stdout piped)."""
  return subprocess.Popen(pretrain_command(STEPS, CHECKPOINT_EVERY, f"--workdir={workdir}"),
                          env=pretrain_env(), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def finished_steps(workdir) -> list[int]:
  """The complete checkpoint steps in ``workdir/checkpoints``."""
  directory = os.path.join(workdir, "checkpoints")
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(int(n) for n in names if n.isdigit())


def kill_after_first_checkpoint(victim: subprocess.Popen, workdir: str, steps: int) -> list[int]:
  """SIGKILLs ``victim`` as soon as ``workdir`` holds a checkpoint; returns the steps saved by then
  (failing if the run ended first, or had finished all ``steps``: the test would prove nothing)."""
  deadline = time.monotonic() + 600
  while not finished_steps(workdir):
    assert victim.poll() is None, victim.communicate()[0][-3000:]
    assert time.monotonic() < deadline
    time.sleep(0.01)
  os.kill(victim.pid, signal.SIGKILL)
  victim.wait()
  saved = finished_steps(workdir)
  assert saved[-1] < steps, "the run finished before the kill: the test proves nothing"
  return saved


def metric_rows(workdir) -> list[dict]:
  """Metric rows without the (timing-dependent) throughput."""
  return [{k: v for k, v in row.items() if k != "examples_per_sec"}
          for row in read_metrics(os.path.join(workdir, "metrics.jsonl"))]


class CrashAtCheckpoint(Exception):
  """Raised by `DiesAfter` where a killed run would stop."""


class DiesAfter(ckpt_lib.RunCheckpoints):
  """Checkpoints that stop the run (as a kill would) right after saving step ``at``."""

  def __init__(self, workdir, at, **kw):
    super().__init__(workdir, **kw)
    self.at = at

  def save(self, step, state, **kw):
    saved = super().save(step, state, **kw)
    if step == self.at:
      self.wait()
      raise CrashAtCheckpoint
    return saved


# The small linearized problems (`six_examples`, `nine_examples` in conftest.py): λ, s, classes.
LAM, SCALE, C = 1e-2, 15.0, 3
SIX_LABELS = np.array([0, 1, 2, 0, 1, 2])
NINE_LABELS = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])


def linearized_problem(dense_jacobian, n: int):
  """A leaky ResNet8 tail (`TAIL`) linearized on n random images: (lin, variables, features,
  J (n·C, P) float64, unravel)."""
  model, variables, x = small_problem(n=n)
  lin = lin_lib.linearize(model, variables, TAIL)
  features = lin.features(variables, x)
  jac, unravel = dense_jacobian(lin, variables, features.h)
  return lin, variables, features, jac, unravel


def plain(labels):
  """s·e_y, c = 1."""
  return losses.one_hot_targets(labels, C, SCALE)


def options(**kw):
  """`FitOptions` with λ = `LAM` and ``kw``."""
  return fit.FitOptions(**{"weight_decay": LAM, **kw})


def dense_objective(jac, features, labels, delta):
  """L(δ) = 1/(2N) Σ‖f0 + Jδ − s·e_y‖² + (λ/2)‖δ‖² in float64."""
  n = len(labels)
  f = np.asarray(features.f0, np.float64) + (jac @ delta).reshape(n, C)
  return 0.5 * np.sum((f - SCALE * np.eye(C)[labels]) ** 2) / n + 0.5 * LAM * delta @ delta


def random_weighted(n: int, seed: int = 3) -> WeightedTargets:
  """Random targets t (n, C) and weights c in [0.5, 6) (n,)."""
  rng = np.random.default_rng(seed)
  return WeightedTargets(jnp.asarray(rng.normal(size=(n, C)) * 5, jnp.float32),
                         jnp.asarray(rng.uniform(0.5, 6.0, n), jnp.float32))
