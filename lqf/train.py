"""Supervised training of a classifier: the loop shared by pretraining and the compat update experiments.

config → data (grain) → model → objective → optax SGD + momentum with warm-up + cosine → jit over a data
mesh (batch sharded, state replicated and donated) → evaluation every ``eval_every`` steps → orbax
checkpoints (resumed automatically, data order included) and JSON-lines metrics.

Config fields read here (see ``configs/pretrain_mnist.py`` for a complete example):
  seed, batch_size (global), num_steps or num_epochs, eval_every (0 = once per epoch), log_every,
  checkpoint_every, keep_checkpoints, eval_batch_size, distributed, overwrite, skip_nonfinite,
  optim.{lr, momentum, nesterov, weight_decay, warmup_steps}, model.* (``model.dtype='bfloat16'``:
  bfloat16 compute, float32 parameters and optimizer state), data.*.

Every input is checked before the workdir is touched, so a bad config leaves an earlier run's files as
they were.

Divergence guard. Inside the jitted step, ``ok = all(isfinite(images)) ∧ isfinite(loss) ∧
isfinite(‖grad‖)``; when not ok the update is not applied (parameters, batch statistics and optimizer
state are selected from the old state) and `NonFinite` records the step. The host reads that record only
at log, evaluation and checkpoint steps (points where it synchronises anyway; a read on every step would
stall the asynchronous dispatch of the next steps): by default the run then stops with a
`FloatingPointError` naming the step, before anything after the bad step is saved, so the last
checkpoint is the last good state (after the first bad step no update is applied, so the steps up to
that check only cost time). With ``config.skip_nonfinite=True`` bad batches are skipped instead and
counted in the metrics (``train_skipped_steps``).
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Iterable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from lqf import checkpoint as ckpt_lib
from lqf import data as data_lib
from lqf import parallel
from lqf.metric_writer import MetricWriter, Progress
from lqf.models import create_model

# loss_fn(logits, embedding, batch, aux) -> (scalar loss, dict of scalar metrics)
LossFn = Callable[[jax.Array, jax.Array, dict, Any], tuple[jax.Array, dict]]


@flax.struct.dataclass
class NonFinite:
  """The divergence guard's record (int32 scalars, saved with the state)."""
  count: jax.Array       # steps whose update was not applied
  first_step: jax.Array  # the first such step, 0 if none
  first_cause: jax.Array  # its cause: INPUT_NONFINITE or LOSS_NONFINITE (0 if none)

  @classmethod
  def none(cls) -> NonFinite:
    zero = jnp.zeros((), jnp.int32)
    return cls(count=zero, first_step=zero, first_cause=zero)


INPUT_NONFINITE, LOSS_NONFINITE = 1, 2


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  nonfinite: NonFinite

  @property
  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats}


def cross_entropy_loss(logits: jax.Array, embedding: jax.Array, batch: dict, aux: Any = None):
  """Mean softmax cross-entropy against integer labels (``embedding`` and ``aux`` unused)."""
  del embedding, aux
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  return loss, {}


def total_steps(config: ml_collections.ConfigDict, num_train: int) -> int:
  """``config.num_steps`` if set, else ``ceil(num_epochs · N / batch_size)``."""
  if config.get("num_steps"):
    steps = int(config.num_steps)
    field = "config.num_steps"
  else:
    steps = math.ceil(float(config.get("num_epochs", 0)) * num_train / config.batch_size)
    field = "config.num_epochs"
  if steps <= 0:
    raise ValueError(f"{field} gives {steps} training steps: set a positive config.num_steps or "
                     "config.num_epochs.")
  return steps


def check_bookkeeping(config: ml_collections.ConfigDict) -> None:
  """Fails on intervals the loop cannot use (``log_every``, ``checkpoint_every``, ...)."""
  for field, least in (("log_every", 1), ("checkpoint_every", 1), ("keep_checkpoints", 1),
                       ("eval_every", 0)):
    value = config.get(field)
    if value is not None and (not isinstance(value, int) or value < least):
      raise ValueError(f"config.{field}={value!r} must be an integer >= {least}.")
  if not isinstance(config.get("skip_nonfinite", False), bool):
    raise ValueError(f"config.skip_nonfinite={config.skip_nonfinite!r} must be True or False.")


def make_optimizer(optim: ml_collections.ConfigDict, steps: int) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum, linear warm-up then cosine decay, decoupled-free L2 on kernels.

  Weight decay λ adds λ·w to the gradient of every parameter with ≥ 2 dimensions (kernels), not of
  BatchNorm scales/biases or Dense biases.
  """
  if optim.lr <= 0:
    raise ValueError(f"config.optim.lr={optim.lr} must be positive (e.g. 0.1).")
  warmup = min(int(optim.get("warmup_steps", 0)), steps - 1)
  schedule = optax.warmup_cosine_decay_schedule(0.0, optim.lr, warmup, steps) if warmup > 0 else \
      optax.cosine_decay_schedule(optim.lr, steps)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.chain(
      optax.add_decayed_weights(optim.get("weight_decay", 0.0), mask=decay_mask),
      optax.sgd(schedule, momentum=optim.get("momentum", 0.9), nesterov=optim.get("nesterov", False)))


def init_state(model: flax.linen.Module, tx: optax.GradientTransformation, seed: int,
               image_shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> TrainState:
  """Initial parameters (from ``seed``), replicated over the mesh.

  Runs once, so on CPU it is compiled without LLVM optimisations (measured on 2 cores: 3 s instead of
  14–25 s for a ResNet-8, dominated by the random initialisers).
  """
  def init(rng):
    variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32))
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      nonfinite=NonFinite.none())
  rng = jax.random.key(seed)
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  init = jax.jit(init, out_shardings=parallel.replicated(mesh)).lower(rng).compile(options)
  return init(rng)


def make_train_step(model: flax.linen.Module, tx: optax.GradientTransformation,
                    loss_fn: LossFn, mesh: jax.sharding.Mesh, *, skip_nonfinite: bool = False):
  """``step(state, batch, aux) -> (state, metrics)``, jitted once with the state donated.

  The update is applied only when the images, the loss and the gradient norm are finite and (unless
  ``skip_nonfinite``) no earlier step was non-finite; otherwise the old parameters, batch statistics
  and optimizer state are kept and ``state.nonfinite`` records the step (see the module docstring).
  """
  def step(state: TrainState, batch: dict, aux: Any):
    def objective(params):
      (logits, emb), updates = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
          return_embedding=True, mutable=["batch_stats"])
      loss, extra = loss_fn(logits, emb, batch, aux)
      return loss, (updates["batch_stats"], logits, extra)
    (loss, (stats, logits, extra)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    grad_norm = optax.global_norm(grads)
    inputs_ok = jnp.all(jnp.isfinite(batch["image"]))
    ok = inputs_ok & jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    guard = state.nonfinite
    apply = ok if skip_nonfinite else ok & (guard.first_step == 0)
    new = (optax.apply_updates(state.params, updates), stats, opt_state)
    old = (state.params, state.batch_stats, state.opt_state)
    params, stats, opt_state = jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)
    step_number = state.step + 1
    first = (guard.first_step == 0) & ~ok
    guard = NonFinite(count=guard.count + (~ok).astype(jnp.int32),
                      first_step=jnp.where(first, step_number, guard.first_step),
                      first_cause=jnp.where(first, jnp.where(inputs_ok, LOSS_NONFINITE, INPUT_NONFINITE),
                                            guard.first_cause))
    new_state = state.replace(step=step_number, params=params, batch_stats=stats, opt_state=opt_state,
                              nonfinite=guard)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return new_state, {"loss": loss, "accuracy": accuracy, "grad_norm": grad_norm,
                       "skipped_steps": guard.count, **extra}

  rep = parallel.replicated(mesh)
  return jax.jit(step, in_shardings=(rep, parallel.batch_sharded(mesh), rep),
                 out_shardings=(rep, rep), donate_argnums=0)


def make_predict(model: flax.linen.Module, mesh: jax.sharding.Mesh):
  """``predict(variables, images) -> (logits, embedding)`` in inference mode, batch sharded."""
  rep, shard = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(lambda v, x: model.apply(v, x, train=False, return_embedding=True),
                 in_shardings=(rep, shard), out_shardings=(shard, shard))


def predict_batches(predict, variables: dict, batches: Iterable[dict], mesh: jax.sharding.Mesh):
  """Logits, embeddings and labels of every (unpadded) example of ``batches`` as numpy arrays.

  Every process passes the same whole batches (`lqf.data.eval_batches`) and gets all the outputs.

  Raises:
    ValueError: a batch holds NaN or Inf pixels.
  """
  logits, embs, labels = [], [], []
  for i, batch in enumerate(batches):
    mask = batch["mask"] > 0
    if not np.isfinite(batch["image"]).all():
      raise ValueError(f"evaluation batch {i} holds NaN or Inf pixels: check the test data "
                       "(config.data.test_split and its source).")
    out_logits, out_emb = predict(variables, parallel.shard_global_batch(batch["image"], mesh))
    logits.append(parallel.process_allgather(out_logits)[mask])
    embs.append(parallel.process_allgather(out_emb)[mask])
    labels.append(np.asarray(batch["label"])[mask])
  return np.concatenate(logits), np.concatenate(embs), np.concatenate(labels)


def evaluate(predict, variables: dict, batches: Iterable[dict], mesh) -> dict[str, float]:
  """Top-1 accuracy and mean cross-entropy over the examples of ``batches``."""
  logits, _, labels = predict_batches(predict, variables, batches, mesh)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return {"accuracy": float(np.mean(logits.argmax(-1) == labels)), "loss": float(loss)}


def train(config: ml_collections.ConfigDict, workdir: str, *, loss_fn: LossFn = cross_entropy_loss,
          aux: Any = None, model: flax.linen.Module | None = None) -> tuple[TrainState, dict]:
  """Trains a classifier from ``config`` in ``workdir``, resuming from its latest checkpoint.

  Args:
    config: the experiment config (fields in the module docstring).
    workdir: where checkpoints, ``config.json`` and ``metrics.jsonl`` go.
    loss_fn: the objective, ``loss_fn(logits, embedding, batch, aux)``; cross-entropy by default.
    aux: a pytree passed to ``loss_fn`` on every step (e.g. a frozen old model's variables), replicated.
    model: the network; default ``create_model(config.model, num_classes)``.

  Returns:
    The final state and the final evaluation metrics on ``data.test_split``.
  """
  parallel.initialize_distributed(config.get("distributed", False))
  check_bookkeeping(config)
  parallel.check_global_batch(config.batch_size, "config.batch_size")
  eval_bs = config.get("eval_batch_size", config.batch_size)
  parallel.check_global_batch(eval_bs, "config.eval_batch_size")
  train_source = data_lib.get_source(config.data, config.data.get("train_split", "train"))
  test_source = data_lib.get_source(config.data, config.data.get("test_split", "test"))
  steps = total_steps(config, len(train_source))
  steps_per_epoch = max(1, len(train_source) // config.batch_size)
  eval_every = config.get("eval_every", 0) or steps_per_epoch
  log_every = config.get("log_every", 50)
  skip_nonfinite = config.get("skip_nonfinite", False)
  model = model or create_model(config.model, data_lib.num_classes(config.data))
  tx = make_optimizer(config.optim, steps)
  train_iter = data_lib.train_iterator(train_source, config.data, global_batch_size=config.batch_size,
                                       seed=config.seed)
  ckpt_lib.claim_workdir(workdir, config)  # the first write: everything above has been checked

  mesh = parallel.data_mesh()
  state = init_state(model, tx, config.seed, data_lib.image_shape(config.data), mesh)
  checkpoints = ckpt_lib.RunCheckpoints(workdir, max_to_keep=config.get("keep_checkpoints", 2),
                                        save_every=config.get("checkpoint_every", steps_per_epoch))
  try:
    if checkpoints.latest_step() is not None:
      state = checkpoints.restore(state, data_iterator=train_iter)
      logging.info("resumed from step %d in %s", int(state.step), checkpoints.directory)
    meta = {"config": json.loads(config.to_json_best_effort()), "num_classes": model.num_classes}
    train_step = make_train_step(model, tx, loss_fn, mesh, skip_nonfinite=skip_nonfinite)
    predict = make_predict(model, mesh)
    aux = parallel.replicate(aux, mesh)
    first = int(state.step)
    writer = MetricWriter(workdir, resume_step=first)
    progress = Progress(steps, config.batch_size, log_every, first)
    eval_metrics = {}
    for step in range(first + 1, steps + 1):
      batch = parallel.shard_batch(next(train_iter), mesh)
      state, metrics = train_step(state, batch, aux)
      log, evaluate_now = step % log_every == 0 or step == steps, step % eval_every == 0 or step == steps
      save = step == steps or checkpoints.should_save(step)
      if not skip_nonfinite and (log or evaluate_now or save):
        stop_if_nonfinite(state, config, checkpoints)
      if log:
        metrics = jax.device_get(metrics)
        throughput = progress(step, float(metrics["loss"])) or {}
        writer.write(step, **{f"train_{k}": v for k, v in metrics.items()}, **throughput)
      if evaluate_now:
        eval_metrics = evaluate(predict, state.variables,
                                data_lib.eval_batches(test_source, config.data, batch_size=eval_bs), mesh)
        writer.write(step, **{f"test_{k}": v for k, v in eval_metrics.items()})
        logging.info("step %d  test accuracy %.4f", step, eval_metrics["accuracy"])
      checkpoints.save(step, state, data_iterator=train_iter, meta=meta, force=step == steps)
    if not eval_metrics:  # resumed at the end: evaluate the restored state
      eval_metrics = evaluate(predict, state.variables,
                              data_lib.eval_batches(test_source, config.data, batch_size=eval_bs), mesh)
  finally:
    checkpoints.close()  # waits for the saves in flight: they hold good states
  return state, eval_metrics


def stop_if_nonfinite(state: TrainState, config: ml_collections.ConfigDict,
                      checkpoints: ckpt_lib.RunCheckpoints) -> None:
  """Raises `FloatingPointError` naming the step if the divergence guard has recorded one."""
  step, cause = (int(x) for x in jax.device_get((state.nonfinite.first_step,
                                                 state.nonfinite.first_cause)))
  if not step:
    return
  checkpoints.wait()
  last = checkpoints.latest_step()
  kept = f"the last good checkpoint is step {last} in {checkpoints.directory}" if last is not None \
      else "no checkpoint had been written"
  if cause == INPUT_NONFINITE:
    what, fix = "the training images hold NaN or Inf", "check the data (config.data)"
  else:
    what, fix = "the loss or gradient is NaN or Inf", f"lower config.optim.lr (now {config.optim.lr})"
  raise FloatingPointError(f"{what} at step {step}: the run stopped without saving a later state and "
                           f"{kept}; {fix}, or set config.skip_nonfinite=True to skip such batches.")
