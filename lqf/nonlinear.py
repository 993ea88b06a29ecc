"""Nonlinear fine-tuning, the baseline: cross-entropy on the real network with AdamW, BatchNorm frozen.

  min_w (1/B) Σ_i CE(f(x_i; w), y_i),   w = (trainable subset, the rest fixed at w0),

stepped by ``optax.adamw`` (decoupled weight decay toward 0, as AdamW defines it). BatchNorm stays in
inference mode with the pretrained statistics, so this method and the linearized ones see the same
network at w0.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lqf import fit as fit_lib
from lqf import guard
from lqf import linearize as lin_lib
from lqf.methods import NonlinearSettings
from lqf.models import DTYPES

_ADAM = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3, weight_decay=0.0)


def _update(state: tuple[Any, Any], batch: tuple[jax.Array, jax.Array], variables: dict, *,
            step: jax.Array, lin: lin_lib.Linearized, from_images: bool = False):
  del step
  train, opt_state = state
  inputs, labels = batch
  h = lin.trunk(variables, inputs) if from_images else inputs

  def loss_fn(t):
    logits = lin.tail({**variables, "params": lin_lib.replace(variables["params"], t)}, h)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  loss, grads = jax.value_and_grad(loss_fn)(train)
  updates, opt_state = _ADAM.update(grads, opt_state, train)
  return (optax.apply_updates(train, updates), opt_state), {"loss": loss}


_step = jax.jit(guard.guarded(_update), static_argnames=("lin", "from_images"), donate_argnums=0)


def finetune_nonlinear(model: Any, variables: dict, images: np.ndarray | fit_lib.ImageStream,
                       labels: np.ndarray | None, *, trainable: str, settings: NonlinearSettings,
                       seed: int, run: Callable[..., Any] = guard.run_steps) -> dict:
  """Cross-entropy fine-tuning of the ``trainable`` parameters (regex) with AdamW; returns new variables.

  In-memory ``images`` (N, H, W, C): the frozen trunk (everything before the first trainable layer,
  BatchNorm in inference mode, no augmentation) is a constant map, so its output is computed once and
  each step runs the trainable tail only — the same optimisation as running the whole network. Full
  batch when the training set has ≤ ``settings.batch_size`` examples, else seeded minibatches
  (`lqf.fit.batch_order`). An `lqf.fit.ImageStream` (``labels`` None): each step runs the trunk on its
  (possibly augmented) batch. ``run``: the loop, as in `lqf.fit.fit_linearized` (e.g. the runtime's
  checkpointing `lqf.runtime.loop.run`). The network computes in ``settings.dtype``; the returned
  variables are float32.
  """
  lin = lin_lib.linearize(model.clone(dtype=DTYPES[settings.dtype]), variables, trainable)
  stream = images if isinstance(images, fit_lib.ImageStream) else None
  train = jax.tree.map(jnp.copy, lin_lib.select(variables["params"], lin.trainable_paths))  # donated below
  opt_state = _ADAM.init(train)
  opt_state.hyperparams["learning_rate"] = jnp.asarray(settings.learning_rate)
  opt_state.hyperparams["weight_decay"] = jnp.asarray(settings.weight_decay)
  if stream is None:
    h = lin.trunk_features(variables, images)
    batches = lambda start: fit_lib.minibatches(  # noqa: E731
        h, jnp.asarray(labels), min(settings.batch_size, len(images)), seed, start)
  else:
    batches = lambda start: stream.batches()  # noqa: E731
  result = run(functools.partial(_step, lin=lin, from_images=stream is not None), guard.init((train, opt_state)), batches,
               steps=settings.steps, args=(variables,),
               data_iterator=None if stream is None else stream.iterator,
               nonfinite_fix=lambda s: f"lower the learning rate (now {settings.learning_rate})")
  train = result.state.state[0]
  return {"params": lin_lib.replace(variables["params"], train), "batch_stats": variables["batch_stats"]}
