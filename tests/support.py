"""What several test files share: small problems, tiny configs, subprocess runs and their inspection.

Plain helpers, imported as ``from support import …`` (no test module imports another); fixtures are in
conftest.py.
"""

import os
import signal
import subprocess
import sys
import time

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

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


STEPS, CHECKPOINT_EVERY = 120, 10  # the stopped-and-resumed runs (test_interrupt.py)


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


# Small networks whose K-FAC quantities are computed by hand (tests/test_kfac.py, tests/test_ntk.py).

N = 5


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.leaky_relu(nn.Dense(4, name="dense1")(x), 0.1)
    return nn.Dense(3, name="dense2")(x)


class ConvNet(nn.Module):
  """Strided conv with asymmetric padding + bias, BatchNorm, dilated VALID conv, mean-pool, Dense."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(3, (3, 3), strides=2, padding=((1, 1), (0, 2)), name="conv1")(x)
    x = nn.leaky_relu(nn.BatchNorm(use_running_average=True, name="bn")(x), 0.1)
    x = nn.Conv(4, (2, 2), padding="VALID", kernel_dilation=2, use_bias=False, name="conv2")(x)
    return nn.Dense(2, name="head")(nn.leaky_relu(x, 0.1).mean(axis=(1, 2)))


def filled(model, x, seed=0):
  """Variables with random values (random BatchNorm statistics too)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x[:1])
  rng = np.random.default_rng(seed)
  def fill(path, s):
    positive = path[-1].key in ("var", "scale")
    return jnp.asarray(rng.uniform(0.5, 1.5, s.shape) if positive else rng.normal(size=s.shape) * 0.7,
                       jnp.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def paths(params):
  return list(traverse_util.flatten_dict(params, sep="/"))


def im2col_index(h, w, k, stride, pads, dilation):
  """Explicit loops: per output position, the (padded-image) indices of its patch in (ky, kx) order."""
  (pt, pb), (pl, pr) = pads
  hp, wp = h + pt + pb, w + pl + pr
  span = (k - 1) * dilation + 1
  rows = []
  for i in range(0, hp - span + 1, stride):
    for j in range(0, wp - span + 1, stride):
      rows.append([(i + ky * dilation, j + kx * dilation) for ky in range(k) for kx in range(k)])
  return np.array(rows), (hp, wp)


def patches(x, index, pads):
  """(H, W, C) -> (T, k·k·C) rows in HWIO kernel order, by explicit gathering."""
  (pt, pb), (pl, pr) = pads
  xp = jnp.pad(x, ((pt, pb), (pl, pr), (0, 0)))
  return xp[index[..., 0], index[..., 1]].reshape(index.shape[0], -1)


def convnet_by_hand(p, stats, x, e1, e2, e3):
  """ConvNet on one example (7, 7, 2) with perturbations e added to each layer's output s."""
  idx1, _ = im2col_index(7, 7, 3, 2, ((1, 1), (0, 2)), 1)
  a1 = patches(x, idx1, ((1, 1), (0, 2)))                                  # (16, 18)
  s1 = a1 @ p["conv1"]["kernel"].reshape(-1, 3) + p["conv1"]["bias"] + e1
  bn = stats["bn"]
  y = (s1 - bn["mean"]) / jnp.sqrt(bn["var"] + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"]
  z = nn.leaky_relu(y, 0.1).reshape(4, 4, 3)
  idx2, _ = im2col_index(4, 4, 2, 1, ((0, 0), (0, 0)), 2)
  a2 = patches(z, idx2, ((0, 0), (0, 0)))                                  # (4, 12)
  s2 = a2 @ p["conv2"]["kernel"].reshape(-1, 4) + e2
  a3 = nn.leaky_relu(s2, 0.1).mean(axis=0)
  return a3 @ p["head"]["kernel"] + p["head"]["bias"] + e3, (a1, a2, a3)


def convnet_per_example(variables, x):
  """Per example, by hand: layer inputs a (T, d) [+ ones for a bias], output gradients g (C, T, out)
  and BatchNorm gradients (C, 3) per leaf — numpy arrays."""
  p, stats = variables["params"], variables["batch_stats"]
  sizes = {"conv1": (16, 3), "conv2": (4, 4), "head": (1, 2)}
  zeros = [jnp.zeros(sizes[k]) for k in ("conv1", "conv2")] + [jnp.zeros(2)]

  @jax.jit
  def per_example(xi):
    acts = convnet_by_hand(p, stats, xi, *zeros)[1]
    jac = jax.jacrev(lambda *e: convnet_by_hand(p, stats, xi, *e)[0], argnums=(0, 1, 2))(*zeros)
    def with_bn(scale, bias):
      return convnet_by_hand({**p, "bn": {"scale": scale, "bias": bias}}, stats, xi, *zeros)[0]
    return acts, jac, jax.jacrev(with_bn, argnums=(0, 1))(p["bn"]["scale"], p["bn"]["bias"])

  ones = lambda a: np.concatenate([a, np.ones((a.shape[0], 1))], 1)  # noqa: E731
  out = []
  for xi in x:
    acts, jac, (js, jb) = jax.tree.map(lambda v: np.asarray(v, np.float64), per_example(xi))
    a = {"conv1": ones(acts[0]), "conv2": acts[1], "head": ones(acts[2][None])}
    g = {k: j.reshape(2, -1, sizes[k][1]) for k, j in zip(sizes, jac)}
    out.append((a, g, {"bn/scale": js, "bn/bias": jb}))
  return out
