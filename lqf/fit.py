"""Fitting the linearized model: one optax code path for K-FAC LQF and its ablations.

`fit_linearized` minimises L(δ) = data_loss(f0 + Jδ, y) + (λ/2)‖δ‖² (`lqf.losses`) over the offset
δ = w − w0 of the trainable parameters, from the cached `Features` of the training set; with
``targets`` (`lqf.losses.WeightedTargets`) the data term is the weighted least squares
1/(2N) Σ_i c_i ‖f0_i + J_iδ − t_i‖² (e.g. FD-LM against an old model, `compat.fd_lm_targets`):

* full batch (``batch_size=None``, e.g. few-shot problems): the tail is linearized once
  (`Linearized.tangent`); a step is a tangent pass for f_lin and its transpose for the gradient.
* minibatches: each jitted step re-linearizes its batch of cached trunk features.
* streamed (`ImageStream`: augmentation, or a training set whose features do not fit in memory):
  each jitted step runs the frozen trunk on its batch of images, then as above; the image iterator's
  position is saved with the fit's checkpoints.

The optimizer is ``optax.chain(preconditioner, step rule)``:
``preconditioner='kfac'`` (`lqf.kfac.kfac_precondition`, factors computed once at w0) or ``'none'``;
``optimizer='quadratic'`` (`lqf.kfac.quadratic_model_step`: step size and momentum that minimise the
exact quadratic along (u, m); with K-FAC this is K-FAC-preconditioned CG), ``'sgd'`` (with momentum)
or ``'adam'``. Steps are jitted with the state donated; the loop runs in Python (on CPU, XLA runs
weight-gradient convolutions ~30× slower inside a while-loop, jax-ml/jax#12868).

Note: initialise the new task's head before linearizing (a zero head makes the Jacobian of every layer
below it vanish).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from lqf import kfac, losses
from lqf.checkpoint import RunCheckpoints
from lqf.linearize import Features, Linearized, jit_tangent, split_batches

Params = Any
OPTIMIZERS = ("quadratic", "sgd", "adam")
PRECONDITIONERS = ("kfac", "none")


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """An optax transform that hashes and compares by its settings (what `make_optimizer` returns).

  Every per-fit array of the transforms built by `make_optimizer` (K-FAC inverses, step state) lives
  in the optimizer state, so two of them with equal ``settings`` update identically and the jitted
  steps (``tx`` is static) compiled for one fit are reused by the next.
  """
  settings: tuple
  tx: optax.GradientTransformationExtraArgs = dataclasses.field(compare=False)

  def init(self, params: Params) -> Any:
    return self.tx.init(params)

  def update(self, updates: Params, state: Any, params: Params | None = None, **extra_args):
    return self.tx.update(updates, state, params, **extra_args)


class FitState(NamedTuple):
  """δ and the optimizer state."""
  delta: Params
  opt_state: Any


def objective(delta: Params, f0: jnp.ndarray, jvp: Callable[[Params], jnp.ndarray],
              labels: jnp.ndarray | None, *, loss: str, target_scale: float, weight_decay: float,
              targets: losses.WeightedTargets | None = None) -> jnp.ndarray:
  """L(δ) = data_loss(f0 + J·δ, y) + (λ/2)‖δ‖² with ``jvp(δ) = J·δ`` (B, C) over a batch.

  With ``targets`` (t (B, C), c (B,)) the data term is 1/(2B) Σ_i c_i ‖f0_i + J_i·δ − t_i‖²
  (`lqf.losses.weighted_squared_error`; ``loss='mse'``, ``labels`` unused).
  """
  return (losses.data_loss(loss, f0 + jvp(delta), labels, target_scale, targets)
          + losses.weight_decay(delta, weight_decay))


def sqrt_curvature(jvp: Callable[[Params], jnp.ndarray], weight_decay: float,
                   weights: jnp.ndarray | None = None
                   ) -> Callable[[Params], tuple[jnp.ndarray, Params]]:
  """S with SᵀS = JᵀCJ/B + λI, the Hessian of the MSE objective: v ↦ (√c ⊙ J·v/√B, √λ·v).

  ``weights``: the per-example weights c (B,) of `lqf.losses.WeightedTargets`; None for c = 1.
  """
  def s(v):
    jv = jvp(v)
    if weights is not None:
      jv = jv * jnp.sqrt(weights)[:, None]
    return jv / jnp.sqrt(jv.shape[0]), optax.tree_utils.tree_scale(jnp.sqrt(weight_decay), v)
  return s


def _update(state: FitState, f0, jvp, labels, targets, target_scale, weight_decay, *, tx, loss):
  """One optimizer step on the batch linearized as (f0, jvp); returns the new state and L(δ)."""
  value, grad = jax.value_and_grad(objective)(state.delta, f0, jvp, labels, loss=loss,
                                               target_scale=target_scale, weight_decay=weight_decay,
                                               targets=targets)
  weights = None if targets is None else targets.weights
  updates, opt_state = tx.update(grad, state.opt_state, state.delta, grad=grad,
                                 sqrt_curvature=sqrt_curvature(jvp, weight_decay, weights))
  return FitState(optax.apply_updates(state.delta, updates), opt_state), value


@functools.partial(jax.jit, static_argnames=("tx", "loss"), donate_argnums=(0,))
def full_batch_step(state: FitState, f0: jnp.ndarray, jvp: Callable, labels: jnp.ndarray | None,
                    target_scale: float, weight_decay: float,
                    targets: losses.WeightedTargets | None = None, *,
                    tx: Optimizer | optax.GradientTransformation,
                    loss: str) -> tuple[FitState, jnp.ndarray]:
  """A step with the whole training set linearized once: (f0, jvp) = ``lin.tangent(w0, h)``.

  ``tx``: `make_optimizer`'s result, or any optax transform accepting the extra arguments ``grad``
  and ``sqrt_curvature`` (e.g. wrapped in ``optax.chain``). ``targets``: see `objective`.
  """
  return _update(state, f0, jvp, labels, targets, target_scale, weight_decay, tx=tx, loss=loss)


@functools.partial(jax.jit, static_argnames=("lin", "tx", "loss", "from_images"), donate_argnums=(0,))
def batch_step(state: FitState, variables: dict, inputs: jnp.ndarray, labels: jnp.ndarray | None,
               target_scale: float, weight_decay: float,
               targets: losses.WeightedTargets | None = None, *, lin: Linearized,
               tx: Optimizer | optax.GradientTransformation, loss: str,
               from_images: bool = False) -> tuple[FitState, jnp.ndarray]:
  """A step on a batch of cached trunk features h, or of (augmented) images if ``from_images``.

  ``targets``: the batch's rows of the `lqf.losses.WeightedTargets`, or None (see `objective`).
  """
  h = lin.trunk(variables, inputs) if from_images else inputs
  f0, jvp = lin.tangent(variables, h)
  return _update(state, f0, jvp, labels, targets, target_scale, weight_decay, tx=tx, loss=loss)


def make_optimizer(lin: Linearized, variables: dict, features: Features, *, loss: str = "mse",
                   preconditioner: str = "kfac", optimizer: str = "quadratic",
                   learning_rate: float = 1.0, momentum: float = 0.9, weight_decay: float = 1e-3,
                   extra_damping: float = 0.0, batch_size: int | None = None,
                   factors: kfac.KFACFactors | None = None, kfac_batch_size: int = 128,
                   weights: jnp.ndarray | None = None) -> Optimizer:
  """``optax.chain(preconditioner, step rule)`` for `fit_linearized` (see the module docstring).

  ``learning_rate``/``momentum`` are used by 'sgd' and 'adam' only; K-FAC factors are computed from
  ``features.h`` (with the per-example ``weights`` c (N,) of a weighted objective, None for c = 1)
  unless given; its damping is ``weight_decay + extra_damping``.
  """
  if preconditioner not in PRECONDITIONERS:
    raise ValueError(f"preconditioner={preconditioner!r} is unknown: use one of {PRECONDITIONERS}.")
  if optimizer not in OPTIMIZERS:
    raise ValueError(f"optimizer={optimizer!r} is unknown: use one of {OPTIMIZERS}.")
  if optimizer == "quadratic" and (loss != "mse" or batch_size is not None):
    raise ValueError("optimizer='quadratic' needs the exact quadratic: loss='mse' and full batch "
                     "(batch_size=None); use optimizer='sgd' or 'adam' otherwise.")
  chain = []
  if preconditioner == "kfac":
    if factors is None:
      factors = kfac.curvature_factors(lin.tail, variables, features.h, lin.trainable,
                                       batch_size=kfac_batch_size, weights=weights)
    chain.append(kfac.kfac_precondition(factors, weight_decay + extra_damping))
  if optimizer == "quadratic":
    delta = lin.init_delta(variables)
    like = (jax.ShapeDtypeStruct(features.f0.shape, jnp.float32), delta)
    chain.append(kfac.quadratic_model_step(like))
  elif optimizer == "sgd":
    chain.append(optax.sgd(learning_rate, momentum))
  else:
    chain.append(optax.adam(learning_rate))
  return Optimizer((preconditioner, optimizer, learning_rate, momentum), optax.chain(*chain))


@dataclasses.dataclass(frozen=True)
class ImageStream:
  """Training images streamed batch by batch: the trunk h(x) runs inside every step (nothing cached).

  Attributes:
    iterator: a checkpointable iterator (`lqf.data.train_iterator`: seeded, ``get_state`` /
      ``set_state``) of {'image': (B, H, W, C) float32, 'label': (B,) int32}; a fit saves its position
      with each checkpoint and restores it on resume.
    batch_size: B.
  """
  iterator: Any
  batch_size: int


def fit_linearized(lin: Linearized, variables: dict, features: Features | ImageStream,
                   labels: jnp.ndarray | None, *, targets: losses.WeightedTargets | None = None,
                   loss: str = "mse", target_scale: float = 15.0, weight_decay: float = 1e-3,
                   preconditioner: str = "kfac", optimizer: str = "quadratic",
                   learning_rate: float = 1.0, momentum: float = 0.9, steps: int = 40,
                   batch_size: int | None = None, extra_damping: float = 0.0,
                   factors: kfac.KFACFactors | None = None, kfac_batch_size: int = 128,
                   seed: int = 0, checkpoints: RunCheckpoints | None = None
                   ) -> tuple[Params, dict[str, np.ndarray]]:
  """Fits δ of the linearized model; K-FAC LQF and its ablations share this code path.

  Args:
    lin: the linearized model (`lqf.linearize.linearize`).
    variables: w0.
    features: cached `Features` (h (N, ...), f0 (N, C)) of the training set, or an `ImageStream`
      of its images (minibatches of the stream's size; ``labels``, ``targets``, ``batch_size`` and
      ``seed`` unused: the stream holds the labels and its own seeded order).
    labels: (N,) integer labels (None when ``targets`` are given or ``features`` is a stream).
    targets: per-example regression targets t (N, C) and weights c (N,) (e.g. `compat.fd_lm_targets`):
      the data term becomes 1/(2N) Σ_i c_i ‖f_lin(x_i; δ) − t_i‖² (``loss='mse'``; ``labels`` and
      ``target_scale`` unused) and the K-FAC factors carry the weights. None: s·e_y, c = 1.
    loss: 'mse' (LQF) or 'ce' (ablation), both + (λ/2)‖δ‖².
    target_scale: s of the MSE targets s·e_y.
    weight_decay: λ (decay toward w0).
    preconditioner: 'kfac' or 'none'.
    optimizer: 'quadratic' (exact step size and momentum; MSE, full batch), 'sgd' or 'adam'.
    learning_rate: for 'sgd'/'adam'.
    momentum: for 'sgd'.
    steps: optimizer steps.
    batch_size: None = full batch; else minibatches sampled without replacement per epoch.
    extra_damping: added to λ in the K-FAC damping.
    factors: precomputed K-FAC factors (else computed from ``features``; required for a stream, e.g.
      `lqf.finetune.stream_factors`).
    kfac_batch_size: examples per pass when computing the factors.
    seed: minibatch order.
    checkpoints: saves (δ, optimizer state, losses so far; a stream's position) at its interval and
      after the last step, and resumes from its latest checkpoint (`resume_loop`): the resumed fit
      equals an uninterrupted one (minibatch order included). None: no checkpoints.

  Returns:
    (δ, history) with history['loss'] (steps,): the objective on each step's batch before its update.
  """
  stream = features if isinstance(features, ImageStream) else None
  if stream is not None:
    if targets is not None or (preconditioner == "kfac" and factors is None):
      raise ValueError("fit_linearized on an ImageStream needs labels from the stream (no targets) and "
                       "precomputed factors with preconditioner='kfac' (lqf.finetune.stream_factors).")
    batch_size = stream.batch_size
  elif targets is not None:
    losses.check_targets(targets, features.f0.shape)
  tx = make_optimizer(lin, variables, features, loss=loss, preconditioner=preconditioner,
                      optimizer=optimizer, learning_rate=learning_rate, momentum=momentum,
                      weight_decay=weight_decay, extra_damping=extra_damping, batch_size=batch_size,
                      factors=factors, kfac_batch_size=kfac_batch_size,
                      weights=None if targets is None else targets.weights)
  delta = lin.init_delta(variables)
  iterator = None if stream is None else stream.iterator
  state, history, start = resume_loop(checkpoints, FitState(delta, tx.init(delta)), steps, iterator)
  values = list(history[:start])
  if batch_size is None:
    f0, jvp = jit_tangent(lin, variables, features.h)
    batches = itertools.repeat(None)
  else:
    batches = minibatches(features if stream else features.h, labels, targets, batch_size, seed, start)
  for step, batch in zip(range(start + 1, steps + 1), batches):
    if batch is None:
      state, value = full_batch_step(state, f0, jvp, labels, target_scale, weight_decay, targets,
                                     tx=tx, loss=loss)
    else:
      inputs, batch_labels, batch_targets = batch
      state, value = batch_step(state, variables, inputs, batch_labels, target_scale, weight_decay,
                                batch_targets, lin=lin, tx=tx, loss=loss,
                                from_images=stream is not None)
    values.append(value)
    save_loop(checkpoints, step, state, values, steps, iterator)
  return state.delta, {"loss": np.asarray(jnp.stack(values)) if values else np.zeros((0,))}


def minibatches(inputs: jnp.ndarray | ImageStream, labels: jnp.ndarray | None, targets: Any,
                batch_size: int, seed: int, start: int) -> Iterator[tuple[jnp.ndarray, Any, Any]]:
  """The (inputs, labels, targets) batches of steps start + 1, start + 2, ... of a minibatch fit.

  Cached ``inputs`` (N, ...) (trunk features h): rows `batch_order` (n, batch_size, seed) of the
  inputs, labels and every leaf of ``targets`` (or None). An `ImageStream`: its next batches of
  (images, labels, None), the iterator standing at step ``start`` (restored by `resume_loop`).
  """
  if isinstance(inputs, ImageStream):
    return ((batch["image"], batch["label"], None) for batch in inputs.iterator)
  n = inputs.shape[0]
  if batch_size > n:
    raise ValueError(f"batch_size={batch_size} exceeds the {n} training examples: use batch_size=None "
                     f"(full batch) or a smaller batch.")
  return ((inputs[idx], _rows(labels, idx), _rows(targets, idx))
          for idx in itertools.islice(batch_order(n, batch_size, seed), start, None))


def batch_order(n: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
  """Endless minibatches of ``batch_size`` indices: consecutive seeded permutations of 0..n−1 cut in
  order (a batch may straddle two permutations), a pure function of (n, batch_size, seed)."""
  rng = np.random.default_rng(seed)
  order = np.zeros((0,), np.int64)
  while True:
    if len(order) < batch_size:
      order = np.concatenate([order, rng.permutation(n)])
    idx, order = order[:batch_size], order[batch_size:]
    yield idx


def resume_loop(checkpoints: RunCheckpoints | None, state: Any, steps: int,
                data_iterator: Any = None) -> tuple[Any, np.ndarray, int]:
  """(state, losses (steps,), steps done) from the latest checkpoint, or (state, zeros, 0).

  A checkpoint holds ``{'state': state, 'loss': losses}`` after the step it is named by
  (`save_loop`); ``state`` is the template it is restored into (any pytree of arrays). A
  ``data_iterator`` (a grain iterator) is moved in place to the position saved with it.
  """
  losses = np.zeros((steps,), np.float32)
  if checkpoints is None or checkpoints.latest_step() is None:
    return state, losses, 0
  start = int(checkpoints.latest_step())
  if start > steps:
    raise ValueError(f"{checkpoints.directory} holds step {start}, beyond steps={steps}: use a new "
                     "workdir or --config.overwrite=True.")
  saved = checkpoints.restore({"state": state, "loss": losses}, data_iterator=data_iterator)
  logging.info("resumed from step %d in %s", start, checkpoints.directory)
  return saved["state"], np.asarray(saved["loss"]), start


def save_loop(checkpoints: RunCheckpoints | None, step: int, state: Any, values: Sequence[Any],
              steps: int, data_iterator: Any = None) -> None:
  """Saves ``state`` and the losses of steps 1..step (and the position of ``data_iterator``, a grain
  iterator, when given) at ``checkpoints``' interval and after the last step."""
  if checkpoints is None or not (step == steps or checkpoints.should_save(step)):
    return
  losses = np.zeros((steps,), np.float32)
  losses[:step] = np.asarray(jnp.stack(list(values)), np.float32)
  checkpoints.save(step, {"state": state, "loss": losses}, data_iterator=data_iterator,
                   force=step == steps)
  if step == steps:
    checkpoints.wait()


def _rows(tree: Any, idx: np.ndarray) -> Any:
  """The rows ``idx`` of every leaf of ``tree`` (labels, `lqf.losses.WeightedTargets` or None)."""
  return jax.tree.map(lambda a: a[idx], tree)


@functools.partial(jax.jit, static_argnames=("lin", "batch_size"))
def predict(lin: Linearized, variables: dict, delta: Params, h: jnp.ndarray,
            batch_size: int | None = None) -> jnp.ndarray:
  """f_lin(x; δ) (N, C) from cached trunk features h (N, ...), ``batch_size`` examples at a time."""
  hs, _ = split_batches(h, min(batch_size or h.shape[0], h.shape[0]))
  logits = jax.lax.map(lambda hb: lin.apply(delta, variables, hb), hs)
  return logits.reshape(-1, logits.shape[-1])[:h.shape[0]]


def evaluate(lin: Linearized, variables: dict, delta: Params, features: Features,
             labels: jnp.ndarray, batch_size: int | None = None) -> float:
  """Accuracy of argmax f_lin(x; δ) on (features, labels)."""
  logits = predict(lin, variables, delta, features.h, batch_size)
  return float(jnp.mean(jnp.argmax(logits, -1) == labels))
