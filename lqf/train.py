"""Supervised training of a classifier: pretraining, the compat update members and the text models.

config → data (grain) → model → objective → optax SGD + momentum with warm-up + cosine → `lqf.runtime.loop`
(the one training loop: jit over a data mesh with the batch sharded and the state replicated and donated,
divergence guard, evaluation every ``eval_every`` steps, orbax checkpoints resumed automatically with the
data order, JSON-lines metrics and progress lines).

`train` is the config-driven run for image classifiers. Its pieces serve any classifier (the text study
uses them with token batches): `init_state`, `make_train_step` (`classifier_update`: cross-entropy or any
`LossFn` of logits and embeddings, BatchNorm statistics updated when the model has them, dropout keys
folded from the state's key and the step), `make_predict`.

Config fields read by `train` (see ``configs/pretrain_mnist.py`` for a complete example):
  seed, batch_size (global), num_steps or num_epochs, eval_every (0 = once per epoch), log_every,
  checkpoint_every, keep_checkpoints, eval_batch_size, distributed, overwrite, skip_nonfinite,
  optim.{lr, momentum, nesterov, weight_decay, warmup_steps}, model.* (``model.dtype='bfloat16'``:
  bfloat16 compute, float32 parameters and optimizer state), data.*.

Every input is checked before the workdir is touched, so a bad config leaves an earlier run's files as
they were. The divergence guard (`lqf.runtime.loop`) stops the run at the first non-finite loss, gradient or
image, naming the step and the kept checkpoint; with ``config.skip_nonfinite=True`` bad batches are
skipped instead and counted in the metrics (``train_skipped_steps``).
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lqf import checks, guard
from lqf import data as data_lib
from lqf.models import create_model
from lqf.runtime import checkpoint as ckpt_lib
from lqf.runtime import config_util, loop, parallel
from lqf.runtime.metric_writer import MetricWriter, Progress

# loss_fn(logits, embedding, batch, aux) -> (scalar loss, dict of scalar metrics)
LossFn = Callable[[jax.Array, jax.Array, dict, Any], tuple[jax.Array, dict]]


@flax.struct.dataclass
class TrainState:
  """A classifier's training state.

  Attributes:
    params: the parameters.
    batch_stats: BatchNorm running statistics ({} for a model without BatchNorm).
    opt_state: the optimizer state.
    rng: raw key data (`jax.random.key_data`) of the dropout key; step t uses fold_in(key, t).
  """
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array

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


def check_config(config: ml_collections.ConfigDict, name: str = "config") -> None:
  """Checks everything `train` reads before any data is read or any model is built: intervals, batch
  sizes against the devices, the optimizer, the step count, the model (its name, activation, widths)
  and the data section (`lqf.data.check`).

  Raises:
    ValueError: one line naming the field (``<name>.<field>``), the value and the fix.
  """
  try:
    check_bookkeeping(config)
    parallel.check_global_batch(config.batch_size, "config.batch_size")
    parallel.check_global_batch(config.get("eval_batch_size", config.batch_size), "config.eval_batch_size")
    optim = config.optim
    checks.check_positive("config.optim.lr", optim.lr, 0.1)
    checks.check_nonnegative("config.optim.weight_decay", optim.get("weight_decay", 0.0), 5e-4)
    checks.check_count("config.optim.warmup_steps", optim.get("warmup_steps", 0), least=0)
    momentum = optim.get("momentum", 0.9)
    checks.check_nonnegative("config.optim.momentum", momentum, 0.9)
    if momentum >= 1:
      raise ValueError(f"config.optim.momentum={momentum!r} must be in [0, 1) (e.g. 0.9).")
    if config.get("num_steps"):
      checks.check_count("config.num_steps", config.num_steps)
    elif not float(config.get("num_epochs", 0) or 0) > 0:
      raise ValueError(f"config.num_steps gives {config.get('num_steps')} training steps: set a positive "
                       "config.num_steps or config.num_epochs.")
    data_lib.check(config.data)
    create_model(config.model, data_lib.num_classes(config.data))
  except ValueError as e:
    raise config_util.within(name, e) from None


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


def init_variables(model: flax.linen.Module, seed: int, image_shape: tuple[int, ...]) -> dict:
  """The model's initial variables from ``seed`` for images of ``image_shape`` (H, W, C).

  Runs once, so on CPU it is compiled without LLVM optimisations (measured on 2 cores: 3 s instead of
  14–25 s for a ResNet-8, dominated by the random initialisers).
  """
  init = lambda rng: model.init(rng, jnp.zeros((1, *image_shape), jnp.float32))  # noqa: E731
  rng = jax.random.key(seed)
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  return jax.jit(init).lower(rng).compile(options)(rng)


def init_state(variables: dict, tx: optax.GradientTransformation, seed: int,
               mesh: jax.sharding.Mesh) -> guard.LoopState:
  """The loop state before step 1 (``variables`` and the optimizer state), replicated over the mesh."""
  state = TrainState(params=variables["params"], batch_stats=variables.get("batch_stats", {}),
                     opt_state=tx.init(variables["params"]),
                     rng=jax.random.key_data(jax.random.key(seed)))
  return parallel.replicate(guard.init(state), mesh)


def classifier_update(state: TrainState, batch: dict, aux: Any, *, step: jax.Array,
                      model: flax.linen.Module, tx: optax.GradientTransformation, loss_fn: LossFn,
                      input_key: str) -> tuple[TrainState, dict]:
  """One optimizer step on ``loss_fn(logits, embedding, batch, aux)`` in training mode.

  BatchNorm statistics are updated when the state has them; dropout draws from
  fold_in(``state.rng``, ``step``). Metrics: loss, accuracy, grad_norm and ``loss_fn``'s own.
  """
  rngs = {"dropout": jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)}

  def objective(params):
    if state.batch_stats:
      (logits, emb), updates = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, batch[input_key], train=True,
          return_embedding=True, mutable=["batch_stats"], rngs=rngs)
      stats = updates["batch_stats"]
    else:
      (logits, emb), stats = model.apply({"params": params}, batch[input_key], train=True,
                                         return_embedding=True, rngs=rngs), state.batch_stats
    loss, extra = loss_fn(logits, emb, batch, aux)
    return loss, (stats, logits, extra)
  (loss, (stats, logits, extra)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new = state.replace(params=optax.apply_updates(state.params, updates), batch_stats=stats,
                      opt_state=opt_state)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
  return new, {"loss": loss, "accuracy": accuracy, "grad_norm": optax.global_norm(grads), **extra}


def make_train_step(model: flax.linen.Module, tx: optax.GradientTransformation, loss_fn: LossFn,
                    mesh: jax.sharding.Mesh, *, input_key: str = "image",
                    skip_nonfinite: bool = False):
  """``step(loop_state, batch, aux) -> (loop_state, metrics)``: `classifier_update` guarded
  (`lqf.runtime.loop.guarded`), jitted once with the batch sharded over ``mesh`` and the state donated."""
  update = functools.partial(classifier_update, model=model, tx=tx, loss_fn=loss_fn, input_key=input_key)
  rep = parallel.replicated(mesh)
  return jax.jit(guard.guarded(update, skip_nonfinite=skip_nonfinite),
                 in_shardings=(rep, parallel.batch_sharded(mesh), rep), out_shardings=(rep, rep),
                 donate_argnums=0)


def make_predict(model: flax.linen.Module, mesh: jax.sharding.Mesh):
  """``predict(variables, images) -> (logits, embedding)`` in inference mode, batch sharded."""
  rep, shard = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(lambda v, x: model.apply(v, x, train=False, return_embedding=True),
                 in_shardings=(rep, shard), out_shardings=(shard, shard))


def evaluate(predict, variables: dict, batches, mesh) -> dict[str, float]:
  """Top-1 accuracy and mean cross-entropy over the examples of ``batches`` (`lqf.data.eval_batches`)."""
  (logits, _), labels = parallel.apply_stream(predict, batches, args=(variables,), mesh=mesh)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return {"accuracy": float(np.mean(logits.argmax(-1) == labels)), "loss": float(loss)}


def nonfinite_fix(stopped: guard.Stopped, config: ml_collections.ConfigDict) -> str:
  """The fix named when the divergence guard stops `train`."""
  fix = "check the data (config.data)" if stopped.inputs else f"lower config.optim.lr (now {config.optim.lr})"
  return f"{fix}, or set config.skip_nonfinite=True to skip such batches"


def train(config: ml_collections.ConfigDict, workdir: str, *, loss_fn: LossFn = cross_entropy_loss,
          aux: Any = None, model: flax.linen.Module | None = None,
          label: str = "train") -> tuple[guard.LoopState, dict]:
  """Trains a classifier from ``config`` in ``workdir``, resuming from its latest checkpoint.

  Args:
    config: the experiment config (fields in the module docstring).
    workdir: where checkpoints, ``config.json`` and ``metrics.jsonl`` go.
    loss_fn: the objective, ``loss_fn(logits, embedding, batch, aux)``; cross-entropy by default.
    aux: a pytree passed to ``loss_fn`` on every step (e.g. a frozen old model's variables), replicated.
    model: the network; default ``create_model(config.model, num_classes)``.
    label: names the run in the progress lines (e.g. "pretrain", "model bct 3/16").

  Returns:
    The final loop state (``.state`` is the `TrainState`) and the test metrics on ``data.test_split``.
  """
  parallel.initialize_distributed(config.get("distributed", False))
  check_config(config)
  ckpt_lib.check_workdir(workdir, config)
  eval_bs = config.get("eval_batch_size", config.batch_size)
  train_source = data_lib.get_source(config.data, config.data.get("train_split", "train"))
  test_source = data_lib.get_source(config.data, config.data.get("test_split", "test"))
  steps = total_steps(config, len(train_source))
  steps_per_epoch = max(1, len(train_source) // config.batch_size)
  skip_nonfinite = config.get("skip_nonfinite", False)
  model = model or create_model(config.model, data_lib.num_classes(config.data))
  tx = make_optimizer(config.optim, steps)
  train_iter = data_lib.train_iterator(train_source, config.data, global_batch_size=config.batch_size,
                                       seed=config.seed)
  ckpt_lib.claim_workdir(workdir, config)  # the first write: everything above has been checked

  mesh = parallel.data_mesh()
  variables = init_variables(model, config.seed, data_lib.image_shape(config.data))
  state = init_state(variables, tx, config.seed, mesh)
  checkpoints = ckpt_lib.RunCheckpoints(workdir, max_to_keep=config.get("keep_checkpoints", 2),
                                        save_every=config.get("checkpoint_every", steps_per_epoch))
  predict = make_predict(model, mesh)

  def test_metrics(s: guard.LoopState) -> dict:
    batches = data_lib.eval_batches(test_source, config.data, batch_size=eval_bs)
    return evaluate(predict, s.state.variables, batches, mesh)
  first = 0 if checkpoints.latest_step() is None else int(checkpoints.latest_step())
  writer = MetricWriter(workdir, resume_step=first)
  try:
    result = loop.run(
        make_train_step(model, tx, loss_fn, mesh, skip_nonfinite=skip_nonfinite), state,
        lambda start: (parallel.shard_batch(batch, mesh) for batch in train_iter), steps=steps,
        args=(parallel.replicate(aux, mesh),), checkpoints=checkpoints, data_iterator=train_iter,
        meta={"config": json.loads(config.to_json_best_effort()), "num_classes": model.num_classes},
        nonfinite_fix=lambda stopped: nonfinite_fix(stopped, config),
        inputs="training images", skip_nonfinite=skip_nonfinite,
        writer=writer,
        progress=Progress(steps, config.batch_size, config.get("log_every", 50), first, label),
        evaluate=test_metrics, eval_every=config.get("eval_every", 0) or steps_per_epoch)
    evaluation = result.evaluation or test_metrics(result.state)  # resumed at the end: evaluate it
  finally:
    writer.close()
    checkpoints.close()  # waits for the saves in flight: they hold good states
  return result.state, evaluation
