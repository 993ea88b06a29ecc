"""Training loop: checkpoint round trip, workdir claim, mixed precision, divergence guard, metric rows.

Multi-device and multi-process runs are in test_distributed.py, the SIGKILL resume in test_interrupt.py and
the one-line errors in test_bad_input.py; the helpers above the tests are shared with them.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lqf import guard, train
from lqf.models import create_model
from lqf.runtime import checkpoint as ckpt_lib
from lqf.runtime import loop, parallel
from lqf.runtime.metric_writer import MetricWriter, read_metrics
from support import poison_batches, tiny_config













def test_checkpoint_round_trip(tmp_path):
  tree = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "step": jnp.array(7)}
  ckpts = ckpt_lib.RunCheckpoints(str(tmp_path), save_every=1)
  ckpts.save(7, tree, meta={"config": {"model": {"name": "x"}}}, force=True)
  ckpts.wait()
  template = jax.tree.map(jnp.zeros_like, tree)
  restored = ckpts.restore(template)
  ckpts.close()
  np.testing.assert_array_equal(restored["params"]["w"], tree["params"]["w"])
  assert int(restored["step"]) == 7


def test_workdir_with_another_config_is_refused(tmp_path):
  workdir = str(tmp_path)
  ckpt_lib.claim_workdir(workdir, tiny_config(steps=1))
  os.makedirs(os.path.join(workdir, "checkpoints", "1"))
  ckpt_lib.claim_workdir(workdir, tiny_config(steps=1))  # the same config: accepted
  with pytest.raises(ValueError, match=r"holds a run of a different config \(fields \['num_steps'\]"):
    ckpt_lib.claim_workdir(workdir, tiny_config(steps=2))
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "1"))  # nothing lost
  other = tiny_config(steps=2)
  other.overwrite = True
  ckpt_lib.claim_workdir(workdir, other)
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["num_steps"] == 2


def test_metric_rows_after_the_resumed_step_are_dropped(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": s, "train_loss": 1.0 / s} for s in range(1, 6)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "train_lo')  # torn by a kill
  text = path.read_text()
  writer = MetricWriter(str(tmp_path), resume_step=3)
  assert path.read_text() == text  # nothing is touched before the first row (a run may still fail)
  writer.write(4, train_loss=0.5)
  assert read_metrics(str(path)) == rows[:3] + [{"step": 4, "train_loss": 0.5}]
  assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_mixed_precision_computes_in_bfloat16_and_keeps_float32_state():
  config = tiny_config()
  assert config.model.dtype == "float32"  # the default everywhere, CPU included
  mesh = parallel.data_mesh()
  models = {}
  for dtype in ("float32", "bfloat16"):
    config.model.dtype = dtype
    models[dtype] = create_model(config.model, 2)
  assert models["float32"].dtype == jnp.float32
  model = models["bfloat16"]
  tx = train.make_optimizer(config.optim, 10)
  state = train.init_state(train.init_variables(model, 0, (8, 8, 1)), tx, 0, mesh)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(16, 8, 8, 1)).astype(np.float32),
           "label": rng.integers(0, 2, 16).astype(np.int32)}

  # Compute dtype: the 9 convolutions and the head's matmul run on bfloat16 operands.
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x))(state.state.variables, batch["image"])
  ops = [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ("conv_general_dilated", "dot_general")]
  assert len(ops) == 10 and all(v.aval.dtype == jnp.bfloat16 for e in ops for v in e.invars)

  # The float32 network with the same parameters: the reference loss.
  logits32, _ = jax.jit(lambda v, x: models["float32"].apply(v, x, train=True, mutable=["batch_stats"]))(
      state.state.variables, batch["image"])
  loss32 = float(optax.softmax_cross_entropy_with_integer_labels(logits32, batch["label"]).mean())

  step = train.make_train_step(model, tx, train.cross_entropy_loss, mesh)
  new, metrics = step(state, parallel.shard_batch(batch, mesh), None)
  floats = [x for x in jax.tree.leaves((new.state.params, new.state.batch_stats, new.state.opt_state))
            if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and all(x.dtype == jnp.float32 for x in floats)
  assert abs(float(metrics["loss"]) - loss32) < 0.02 * loss32  # bfloat16 has an 8-bit mantissa
  assert float(metrics["loss"]) != loss32


def test_train_step_types_carry_no_sharding():
  """The step traces with the batch's sharding left to XLA: no ``@data`` in any traced type.

  Under an Explicit mesh axis (sharding in types) the gradient of the integer-label cross-entropy, a
  scatter-add into the batch-sharded logits, does not trace on jax 0.11 (``ShardingTypeError``); on
  jax 0.10.2 the same step traces but its types already read ``f32[16@data,...]``, which is what this
  checks on any JAX.
  """
  config = tiny_config()
  mesh = parallel.data_mesh()
  model = create_model(config.model, 2)
  tx = train.make_optimizer(config.optim, 10)
  state = train.init_state(train.init_variables(model, 0, (8, 8, 1)), tx, 0, mesh)
  rng = np.random.default_rng(0)
  batch = parallel.shard_batch({"image": rng.normal(size=(16, 8, 8, 1)).astype(np.float32),
                                "label": rng.integers(0, 2, 16).astype(np.int32)}, mesh)
  step = train.make_train_step(model, tx, train.cross_entropy_loss, mesh)
  jaxpr = str(jax.make_jaxpr(step)(state, batch, None))
  assert "scatter-add" in jaxpr and f"@{parallel.DATA_AXIS}" not in jaxpr


def test_divergence_guard_skips_a_bad_batch_when_asked(tmp_path, monkeypatch):
  # Finite but huge pixels: the convolutions overflow, so the loss (not the input) is non-finite.
  poison_batches(monkeypatch, at=3, value=3e38)
  config = tiny_config(steps=5)
  config.skip_nonfinite = True
  config.checkpoint_every = 1
  config.keep_checkpoints = 10
  state, metrics = train.train(config, str(tmp_path))
  assert int(state.guard.first_step) == 3
  assert int(state.guard.first_cause) == guard.LOSS_NONFINITE
  assert np.isfinite(metrics["loss"])
  rows = [r for r in read_metrics(str(tmp_path / "metrics.jsonl")) if "train_loss" in r]
  assert [r["train_skipped_steps"] for r in rows] == [0, 0, 1, 1, 1]
  assert not np.isfinite(rows[2]["train_loss"]) and np.isfinite(rows[3]["train_loss"])
  checkpoints = ckpt_lib.RunCheckpoints(str(tmp_path))
  saved = {s: checkpoints.restore({"loop": state, "loss": np.zeros(5, np.float32)}, step=s)["loop"].state
           for s in (2, 3, 4)}
  checkpoints.close()
  unchanged = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  for part in ("params", "batch_stats", "opt_state"):
    assert unchanged(getattr(saved[2], part), getattr(saved[3], part)), part  # step 3 not applied
  assert not unchanged(saved[3].params, saved[4].params)  # step 4 is


def test_divergence_stop_message_names_the_step_and_the_kept_checkpoint(tmp_path):
  """The message of the stop (the stop itself runs end to end in test_bad_input.py, NaN row)."""
  config = tiny_config()
  config.optim.lr = 3.0
  record = guard.Guard(count=jnp.array(1), first_step=jnp.array(17),
                       first_cause=jnp.array(guard.LOSS_NONFINITE))
  state = guard.LoopState(step=jnp.array(20), state={}, guard=record)
  checkpoints = ckpt_lib.RunCheckpoints(str(tmp_path), save_every=1)
  checkpoints.save(15, {"params": {"w": jnp.ones(2)}}, force=True)
  fix = lambda stopped: train.nonfinite_fix(stopped, config)  # noqa: E731
  with pytest.raises(FloatingPointError,
                     match=r"loss or gradient is NaN or Inf at step 17: .* last good checkpoint is step "
                           r"15 in .*; lower config.optim.lr \(now 3.0\), or set config.skip_nonfinite"):
    loop.check_guard(state, checkpoints, fix)
  checkpoints.close()
  loop.check_guard(state.replace(guard=guard.Guard.none()), checkpoints, fix)
