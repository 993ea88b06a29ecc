"""The one training loop (`lqf.runtime.loop`): guarded steps, the divergence guard, resume, progress and metrics,
on a least-squares problem whose gradient-descent iterates are written out in numpy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lqf import guard
from lqf.runtime import checkpoint as ckpt_lib
from lqf.runtime import loop
from lqf.runtime.metric_writer import MetricWriter, Progress, read_metrics
from support import CrashAtCheckpoint, DiesAfter


RNG = np.random.default_rng(0)
X, Y = RNG.normal(size=(12, 3)).astype(np.float32), RNG.normal(size=12).astype(np.float32)
LR = 0.1


def _update(w, batch, *, step):
  """Gradient descent on ½ mean (x·w − y)² over a batch of rows (x, y)."""
  del step
  x, y = batch
  loss, grad = jax.value_and_grad(lambda w: 0.5 * jnp.mean((x @ w - y) ** 2))(w)
  return w - LR * grad, {"loss": loss, "grad_norm": jnp.linalg.norm(grad)}


STEP = jax.jit(guard.guarded(_update), donate_argnums=0)
SKIP = jax.jit(guard.guarded(_update, skip_nonfinite=True), donate_argnums=0)


def batches(start, poison_at=None):
  """Rows (3k, 3k + 1, 3k + 2) mod 12 for step k + 1; the batch of step ``poison_at`` holds NaN."""
  for k in range(start, 10**6):
    idx = np.arange(3 * k, 3 * k + 3) % 12
    x = X[idx].copy()
    if k + 1 == poison_at:
      x[0, 0] = np.nan
    yield x, Y[idx]


def numpy_iterates(steps, skip=()):
  w, out = np.zeros(3), []
  for k in range(steps):
    idx = np.arange(3 * k, 3 * k + 3) % 12
    out.append(0.5 * np.mean((X[idx] @ w - Y[idx]) ** 2))
    if k + 1 not in skip:
      w = w - LR * X[idx].T @ (X[idx] @ w - Y[idx]) / 3
  return w, np.array(out)


def test_run_is_gradient_descent_with_the_loss_history():
  result = loop.run(STEP, guard.init(jnp.zeros(3)), batches, steps=7)
  w, losses = numpy_iterates(7)
  np.testing.assert_allclose(result.state.state, w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(result.losses, losses, rtol=1e-5)
  assert int(result.state.step) == 7 and int(result.state.guard.count) == 0


def test_a_bad_batch_stops_the_run_naming_the_step_and_the_fix():
  with pytest.raises(FloatingPointError, match=r"^the training inputs hold NaN or Inf at step 4: the run "
                                               r"stopped without saving a later state and no checkpoint "
                                               r"had been written; check the batches\.$"):
    loop.run(STEP, guard.init(jnp.zeros(3)), functools.partial(batches, poison_at=4), steps=6,
             nonfinite_fix=lambda stopped: "check the batches" if stopped.inputs else "lower it")


def test_skipping_leaves_the_bad_step_out():
  result = loop.run(SKIP, guard.init(jnp.zeros(3)), functools.partial(batches, poison_at=4), steps=6,
                    skip_nonfinite=True)
  w, _ = numpy_iterates(6, skip={4})
  np.testing.assert_allclose(result.state.state, w, rtol=1e-5, atol=1e-6)
  assert int(result.state.guard.first_step) == 4 and int(result.state.guard.count) == 1
  assert int(result.state.guard.first_cause) == guard.INPUT_NONFINITE
  assert np.isnan(result.losses[3]) and np.isfinite(np.delete(result.losses, 3)).all()


def test_interrupted_run_resumes_to_the_same_state_losses_and_metrics(tmp_path):
  def run(workdir, checkpoints):
    first = checkpoints.latest_step() or 0
    return loop.run(STEP, guard.init(jnp.zeros(3)), batches, steps=9, checkpoints=checkpoints,
                    writer=MetricWriter(str(workdir), resume_step=first),
                    progress=Progress(9, 3, every=2, first_step=first, label="toy"),
                    evaluate=lambda s: {"w0": float(s.state[0])}, eval_every=3)
  full = ckpt_lib.RunCheckpoints(str(tmp_path / "full"), save_every=2)
  expected = run(tmp_path / "full", full)
  full.close()
  with pytest.raises(CrashAtCheckpoint):
    run(tmp_path / "killed", DiesAfter(str(tmp_path / "killed"), at=4, save_every=2))
  resumed = ckpt_lib.RunCheckpoints(str(tmp_path / "killed"), save_every=2)
  got = run(tmp_path / "killed", resumed)
  resumed.close()
  np.testing.assert_array_equal(got.state.state, expected.state.state)
  np.testing.assert_array_equal(got.losses, expected.losses)
  assert got.evaluation == expected.evaluation
  strip = lambda rows: [{k: v for k, v in r.items() if k != "examples_per_sec"} for r in rows]  # noqa: E731
  rows = [strip(read_metrics(str(tmp_path / w / "metrics.jsonl"))) for w in ("full", "killed")]
  assert rows[0] == rows[1]
  assert [r["step"] for r in rows[0] if "train_loss" in r] == [2, 4, 6, 8, 9]
  assert [r["step"] for r in rows[0] if "test_w0" in r] == [3, 6, 9]


def test_progress_lines_name_the_run_and_the_remaining_time(caplog):
  caplog.set_level("INFO")
  loop.run(STEP, guard.init(jnp.zeros(3)), batches, steps=4, progress=Progress(4, 3, every=2, label="toy"))
  lines = [r.getMessage() for r in caplog.records if "toy" in r.getMessage()]
  assert len(lines) == 2 and lines[0].startswith("toy  step 2/4  loss ") and "examples/s  ETA" in lines[0]
