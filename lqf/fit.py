"""Fitting the linearized model: one optax code path for K-FAC LQF and its ablations.

`fit_linearized` minimises the LQF objective (`lqf.losses`)

  L(δ) = 1/(2N) Σ_i c_i ‖f0_i + J_iδ − t_i‖² + (λ/2)‖δ‖²

over the offset δ = w − w0 of the trainable parameters, against `lqf.losses.WeightedTargets` (t, c):
s·e_y with c = 1 for plain LQF (`lqf.losses.one_hot_targets`), or e.g. FD-LM against an old model
(`compat.fd_lm_targets`). ``loss='ce'`` replaces the squared error by the cross-entropy against each
target's class argmax_k t_ik (the ablation). How it is optimised is a `FitOptions` value:

* full batch (``batch_size=None``, e.g. few-shot problems): the tail is linearized once
  (`Linearized.tangent`); a step is a tangent pass for f_lin and its transpose for the gradient.
* minibatches: each jitted step re-linearizes its batch of cached trunk features.
* streamed (`ImageStream`: augmentation, or a training set whose features do not fit in memory):
  each jitted step runs the frozen trunk on its batch of images, then as above; the image iterator's
  position is saved with the fit's checkpoints.

The optimizer is ``optax.chain(preconditioner, step rule)``:
``preconditioner='nystrom'`` (`lqf.nystrom.nystrom_precondition`, a rank-ℓ sketch of the constant
curvature computed once at w0), ``'kfac'`` (`lqf.kfac.kfac_precondition`, factors computed once at w0)
or ``'none'``; ``optimizer='quadratic'`` (`lqf.step_rules.quadratic_model_step`: step size and momentum that
minimise the exact quadratic along (u, m); with a preconditioner this is preconditioned CG), ``'sgd'``
(with momentum; ``learning_rate='auto'`` takes 0.2 × the stable limit 2(1 + β)/λmax(MH), `lqf.stability`)
or ``'adam'``; or ``optimizer='exact'``: no steps, the optimum δ* itself by the certified solve
(`lqf.solve.solve_linearized`, its residual certificate in the history). The penalty is (λ/2)‖δ‖², or
with ``regularizer='kfac'`` / ``'nystrom'`` (`optimizer='exact'`) ridge in that curvature's metric,
(λ/2)δᵀMδ (`lqf.metric`: what early-stopped preconditioned steps approximate); ``weight_decay='loo'``
(`optimizer='exact'`) chooses λ on `lqf.influence.LOO_GRID` by the exact leave-one-out loss of the
training set (`lqf.influence.RidgePath`, no held-out split). The steps are `lqf.guard.guarded`
(divergence guard), jitted once per optimizer setting with the state donated, and run by the loop the caller passes as ``run``: `lqf.guard.run_steps` by default, or
the runtime's loop with checkpoints, resume and progress (`lqf.runtime.loop.run`). The loop runs in
Python (on CPU, XLA runs weight-gradient convolutions ~30× slower inside a while-loop, jax-ml/jax#12868).

Note: initialise the new task's head before linearizing (a zero head makes the Jacobian of every layer
below it vanish).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


from lqf import checks, guard, inference, influence, losses, preconditioners, solve, stability, step_rules
from lqf import metric as metric_lib
from lqf.linearize import Features, Linearized, jit_tail, jit_tangent, jit_trunk

Params = Any
logger = logging.getLogger(__name__)
OPTIMIZERS = ("quadratic", "sgd", "adam", "exact")
EXACT_TOL, EXACT_MAXITER = 1e-4, 300  # optimizer='exact': the certificate to reach, the CG iteration cap
EUCLIDEAN = "euclidean"  # the regularizer (λ/2)‖δ‖²; a registered preconditioner's name is its metric
LOO = "loo"  # weight_decay chosen by exact leave-one-out
Curvature = Any  # what a registered preconditioner computes once at w0 (`lqf.preconditioners`)


@dataclasses.dataclass(frozen=True)
class FitOptions:
  """How δ is fitted (hashable: fits with equal options reuse the compiled steps).

  ``FitOptions()`` is the early-stopped fit: 40 K-FAC-preconditioned exact-quadratic steps on the Euclidean
  objective. LQF's default (`lqf.methods.LQFSettings`, the configs) is ``optimizer='exact',
  regularizer='kfac'``: the certified optimum of ridge in K-FAC's metric (README, "Which model is certified").

  Attributes:
    loss: 'mse' (LQF) or 'ce' (ablation), both + the penalty (λ/2)‖δ‖² (or (λ/2)δᵀMδ, ``regularizer``).
    weight_decay: λ (decay toward w0); 'loo' (optimizer 'exact'): the λ of `lqf.influence.LOO_GRID` with
      the smallest exact leave-one-out loss on the training set (kernel form: few examples).
    regularizer: 'euclidean' (M = I) or a registered preconditioner's name ('kfac', 'nystrom', …): ridge
      in its damped curvature M = H̃₀ + μI at w0 (`lqf.metric`; optimizer 'exact').
    metric_damping: μ of that metric.
    preconditioner: a registered name (`lqf.preconditioners`: 'kfac', 'nystrom', …) or 'none' (the
      steps' preconditioner; 'exact' uses the solve's own).
    optimizer: 'quadratic' (exact step size and momentum: MSE and full batch only), 'sgd', 'adam', or
      'exact' (δ* by `lqf.solve.solve_linearized` to relative residual `EXACT_TOL`, at most
      `EXACT_MAXITER` CG iterations; MSE, full batch, cached features).
    learning_rate: for 'sgd' / 'adam'; 'auto' (sgd on the MSE; 'quadratic' ignores it):
      `lqf.stability.auto_learning_rate` of λmax(MH) on the fit's first batch (all N at full batch).
    momentum: for 'sgd'.
    steps: optimizer steps (not for 'exact').
    batch_size: None = full batch; else minibatches sampled without replacement per epoch.
    extra_damping: added to λ in the preconditioner's damping.
    curvature_batch_size: examples per chunk when the curvature (K-FAC factors, Nyström sketch) is
      computed here.
    nystrom_rank: ℓ of the Nyström sketch.
  """
  loss: str = "mse"
  weight_decay: float | str = 1e-3
  regularizer: str = EUCLIDEAN
  metric_damping: float = 1e-3
  preconditioner: str = "kfac"
  optimizer: str = "quadratic"
  learning_rate: float | str = 1.0
  momentum: float = 0.9
  steps: int = 40
  batch_size: int | None = None
  extra_damping: float = 0.0
  curvature_batch_size: int = 128
  nystrom_rank: int = 128

  def __post_init__(self):
    checks.check_choice("loss", self.loss, losses.LOSSES)
    checks.check_choice("preconditioner", self.preconditioner,
                        (*preconditioners.names(), preconditioners.NONE))
    checks.check_choice("optimizer", self.optimizer, OPTIMIZERS)
    checks.check_choice("regularizer", self.regularizer, (EUCLIDEAN, *preconditioners.names()))
    checks.check_positive("metric_damping", self.metric_damping, 1e-3)
    if self.weight_decay != LOO:
      checks.check_nonnegative("weight_decay", self.weight_decay, f"1e-3 or {LOO!r}")
    checks.check_nonnegative("extra_damping", self.extra_damping, 0.0)
    if self.optimizer != "exact":
      for field, value, needs_exact in (("weight_decay", self.weight_decay, self.weight_decay == LOO),
                                        ("regularizer", self.regularizer, self.regularizer != EUCLIDEAN)):
        if needs_exact:
          raise ValueError(f"{field}={value!r} defines the exact optimum δ*, not the steps' objective: use "
                           f"optimizer='exact' (optimizer={self.optimizer!r} now).")
    elif self.loss != "mse" or self.batch_size is not None:
      raise ValueError(f"optimizer='exact' solves the least-squares objective on the full batch, but "
                       f"loss={self.loss!r}, batch_size={self.batch_size}: use loss='mse' and batch_size=None.")
    if (self.optimizer != "exact" and self.preconditioner != preconditioners.NONE
        and not self.weight_decay + self.extra_damping > 0):
      raise ValueError(f"weight_decay={self.weight_decay!r} (+ extra_damping) is the {self.preconditioner} "
                       "preconditioner's damping and must be > 0: use e.g. weight_decay=1e-3.")
    if self.learning_rate == "auto":
      if self.optimizer == "adam" or self.loss != "mse":
        raise ValueError(f"learning_rate='auto' is the stable step of SGD on the least-squares quadratic, "
                         f"but optimizer={self.optimizer!r}, loss={self.loss!r}: use optimizer='sgd' and "
                         "loss='mse', or a number.")
      if self.preconditioner == "nystrom" and self.batch_size is not None:
        raise ValueError(f"learning_rate='auto' with preconditioner='nystrom' and minibatches (batch_size="
                         f"{self.batch_size}) is not stable at its fraction of η_max (bench/RESULTS.md, "
                         "stable window): use preconditioner='kfac', or a number.")
    else:
      checks.check_positive("learning_rate", self.learning_rate, "0.002 or 'auto'")
    checks.check_nonnegative("momentum", self.momentum, 0.9)
    if self.momentum >= 1:
      raise ValueError(f"momentum={self.momentum!r} must be in [0, 1) (e.g. 0.9).")
    checks.check_count("steps", self.steps)
    checks.check_count("batch_size", self.batch_size, optional=True)
    checks.check_count("curvature_batch_size", self.curvature_batch_size)
    checks.check_count("nystrom_rank", self.nystrom_rank)
    if self.optimizer == "quadratic" and (self.loss != "mse" or self.batch_size is not None):
      raise ValueError(f"optimizer='quadratic' needs the exact quadratic, loss='mse' and the full batch "
                       f"(its step size minimises the whole objective), but loss={self.loss!r}, "
                       f"batch_size={self.batch_size}: use optimizer='sgd' (K-FAC + SGD with momentum) "
                       "or 'adam' otherwise, or batch_size=None.")


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
  """δ, the optimizer state and, for a full-batch 'quadratic' fit, the carried residual S_J·δ.

  residual: √c ⊙ Jδ / √N (N, C), updated by the step's own S·(αu + βm) (`lqf.step_rules.quadratic_model_step`),
    so that a step costs one tangent and one transposed pass instead of two tangent passes and one
    transposed pass; None for the other fits.
  """
  delta: Params
  opt_state: Any
  residual: Any = None


def objective(delta: Params, f0: jnp.ndarray, jvp: Callable[[Params], jnp.ndarray],
              targets: losses.WeightedTargets, *, loss: str, weight_decay: float) -> jnp.ndarray:
  """L(δ) = data_loss(f0 + J·δ, targets) + (λ/2)‖δ‖² with ``jvp(δ) = J·δ`` (B, C) over a batch
  (`lqf.losses.data_loss`)."""
  return losses.data_loss(loss, f0 + jvp(delta), targets) + losses.weight_decay(delta, weight_decay)


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


def _update(state: FitState, f0, jvp, targets, weight_decay, *, tx, loss):
  """One optimizer step on the batch linearized as (f0, jvp); returns the new state and L(δ)."""
  value, grad = jax.value_and_grad(objective)(state.delta, f0, jvp, targets, loss=loss,
                                               weight_decay=weight_decay)
  updates, opt_state = tx.update(grad, state.opt_state, state.delta, grad=grad,
                                 sqrt_curvature=sqrt_curvature(jvp, weight_decay, targets.weights))
  return FitState(optax.apply_updates(state.delta, updates), opt_state), {"loss": value}


def _full_batch_update(state: FitState, batch: None, f0: jnp.ndarray, jvp: Callable,
                       targets: losses.WeightedTargets, weight_decay: float, *, step: jax.Array,
                       tx: Optimizer | optax.GradientTransformation, loss: str):
  """A step with the whole training set linearized once: (f0, jvp) = ``lin.tangent(w0, h)``.

  With a carried residual r = S_J·δ (a 'quadratic' fit, `FitState`): L(δ) = ½‖z + r‖² + (λ/2)‖δ‖² with
  z = √c ⊙ (f0 − t)/√N, ∇L = S_Jᵀ(z + r) + λδ (one transposed pass), and r moves by the first part of
  S·(αu + βm) that the quadratic step has computed.
  """
  del batch, step
  if state.residual is None:
    return _update(state, f0, jvp, targets, weight_decay, tx=tx, loss=loss)
  root = jnp.sqrt(losses.example_weights(targets) / f0.shape[0])[:, None]
  r = root * (f0 - targets.targets) + state.residual
  value = 0.5 * jnp.sum(r * r) + losses.weight_decay(state.delta, weight_decay)
  grad = optax.tree_utils.tree_add_scale(jax.linear_transpose(jvp, state.delta)(root * r)[0],
                                         weight_decay, state.delta)
  updates, opt_state = tx.update(grad, state.opt_state, state.delta, grad=grad,
                                 sqrt_curvature=sqrt_curvature(jvp, weight_decay, targets.weights))
  residual = state.residual + step_rules.quadratic_state(opt_state).sqrt_curvature_previous[0]
  return FitState(optax.apply_updates(state.delta, updates), opt_state, residual), {"loss": value}


def _batch_update(state: FitState, batch: tuple[jnp.ndarray, losses.WeightedTargets], variables: dict,
                  weight_decay: float, *, step: jax.Array, lin: Linearized,
                  tx: Optimizer | optax.GradientTransformation, loss: str, from_images: bool = False):
  """A step on a batch (inputs, targets) of cached trunk features h, or of images if ``from_images``."""
  del step
  inputs, targets = batch
  h = lin.trunk(variables, inputs) if from_images else inputs
  f0, jvp = lin.tangent(variables, h)
  return _update(state, f0, jvp, targets, weight_decay, tx=tx, loss=loss)


# ``step(loop_state, batch, *args, tx=..., loss=...)``: guarded loop steps (`lqf.guard`), jitted once per
# (optimizer settings, loss, linearization), the loop state donated.
full_batch_step = jax.jit(guard.guarded(_full_batch_update), static_argnames=("tx", "loss"),
                          donate_argnums=0)
batch_step = jax.jit(guard.guarded(_batch_update), static_argnames=("lin", "tx", "loss", "from_images"),
                     donate_argnums=0)


def curvature_of(options: FitOptions, lin: Linearized, variables: dict, h: jnp.ndarray,
                 weights: jnp.ndarray | None = None, name: str | None = None) -> Curvature:
  """What the registered preconditioner ``name`` (default ``options.preconditioner``, `lqf.preconditioners`)
  needs, computed once at w0 from the trunk features h (N, ...) of the training examples with weights c
  (N,) (None: c = 1)."""
  return preconditioners.get(name or options.preconditioner).compute(lin, variables, h, weights, options)


def _check_curvature(options: FitOptions, curvature: Curvature | None) -> None:
  needs = preconditioners.get(options.preconditioner).curvature_type
  if not isinstance(curvature, needs):
    raise ValueError(f"preconditioner={options.preconditioner!r} needs {needs.__name__} (computed once at "
                     f"w0, lqf.fit.curvature_of), got {type(curvature).__name__}.")


def make_optimizer(options: FitOptions, *, curvature: Curvature | None = None,
                   sqrt_curvature_like: Any = None) -> Optimizer:
  """``optax.chain(preconditioner, step rule)`` of ``options`` (see the module docstring).

  Args:
    options: the fit's settings (a number as ``learning_rate``); the preconditioner's damping is
      ``weight_decay + extra_damping``.
    curvature: the K-FAC factors (``preconditioner='kfac'``) or the Nyström sketch ('nystrom') at w0
      (`curvature_of`).
    sqrt_curvature_like: the shapes of S·v, (ShapeDtypeStruct (N, C), δ), for ``optimizer='quadratic'``.
  """
  if options.optimizer == "exact":
    raise ValueError("optimizer='exact' takes no steps (fit_linearized solves for δ*): give make_optimizer "
                     "a step rule ('quadratic', 'sgd' or 'adam').")
  chain = []
  if options.preconditioner != preconditioners.NONE:
    _check_curvature(options, curvature)
    damping = options.weight_decay + options.extra_damping
    chain.append(preconditioners.get(options.preconditioner).transform(curvature, damping))
  if options.optimizer == "quadratic":
    chain.append(step_rules.quadratic_model_step(sqrt_curvature_like))
  elif options.optimizer == "sgd":
    chain.append(optax.sgd(options.learning_rate, options.momentum))
  else:
    chain.append(optax.adam(options.learning_rate))
  return Optimizer((options.preconditioner, options.optimizer, options.learning_rate, options.momentum),
                   optax.chain(*chain))


@dataclasses.dataclass(frozen=True)
class ImageStream:
  """Training images streamed batch by batch: the trunk h(x) runs inside every step (nothing cached).

  Attributes:
    iterator: a checkpointable iterator (`lqf.data.train_iterator`: seeded, ``get_state`` /
      ``set_state``) of {'image': (B, H, W, C) float32, 'label': (B,) int32}; a fit saves its position
      with each checkpoint and restores it on resume.
    batch_size: B.
    num_classes: C (a linearized fit's targets are s·e_y of the labels, `lqf.losses.one_hot_targets`).
    target_scale: s.
  """
  iterator: Any
  batch_size: int
  num_classes: int
  target_scale: float = 15.0

  def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images, labels) of the stream's next batches."""
    return ((batch["image"], batch["label"]) for batch in self.iterator)

  def target_batches(self) -> Iterator[tuple[np.ndarray, losses.WeightedTargets]]:
    """(images, s·e_y targets) of the stream's next batches."""
    return ((x, losses.one_hot_targets(jnp.asarray(y), self.num_classes, self.target_scale))
            for x, y in self.batches())


def _learning_rate_fix(options: FitOptions) -> Callable[[guard.Stopped], str]:
  return lambda stopped: f"lower the learning rate (now {options.learning_rate})"


def _auto_learning_rate(lin: Linearized, variables: dict, sample: Features,
                        targets: losses.WeightedTargets, options: FitOptions,
                        curvature: Curvature | None) -> float:
  """`lqf.stability.auto_learning_rate` of λmax(MH_B), H_B the curvature over the B examples of
  ``sample`` (the fit's first batch) and M the fit's preconditioner."""
  matvec, _ = solve.normal_equations(lin, variables, sample, targets, weight_decay=options.weight_decay)
  precondition = (None if curvature is None else
                  solve.preconditioner(curvature, options.weight_decay + options.extra_damping))
  top = stability.largest_eigenvalue(matvec, precondition or (lambda v: v), lin.init_delta(variables))
  rate = stability.auto_learning_rate(top, options.momentum)
  logger.info("learning_rate='auto': λmax(MH) = %.4g on %d examples, stable below %.4g; lr = %.4g",
               top, sample.h.shape[0], stability.stability_limit(top, options.momentum), rate)
  return rate


def fit_linearized(lin: Linearized, variables: dict, train: Features | ImageStream,
                   targets: losses.WeightedTargets | None, options: FitOptions, *,
                   curvature: Curvature | None = None, seed: int = 0,
                   run: Callable[..., Any] = guard.run_steps,
                   nonfinite_fix: Callable[[guard.Stopped], str] | None = None
                   ) -> tuple[Params, dict[str, np.ndarray]]:
  """Fits δ of the linearized model; K-FAC LQF and its ablations share this code path.

  Args:
    lin: the linearized model (`lqf.linearize.linearize`).
    variables: w0.
    train: cached `Features` (h (N, ...), f0 (N, C)) of the training set, or an `ImageStream` of its
      images (minibatches of the stream's size, targets from its labels, its own seeded order).
    targets: t (N, C) and c (N,) of the cached training set (None for a stream).
    options: the objective's λ and loss and how it is optimised (`FitOptions`).
    curvature: the preconditioner's K-FAC factors or Nyström sketch at w0; computed here from the
      cached features (weighted by c, `curvature_of`) when None; required for a stream (e.g.
      `lqf.kfac.stream_factors`).
    seed: minibatch order.
    run: the loop, ``run(step, state, batches, *, steps, args, data_iterator, nonfinite_fix)`` returning
      ``.state`` and ``.losses``: `lqf.guard.run_steps` (default), or e.g.
      ``functools.partial(lqf.runtime.loop.run, checkpoints=..., progress=..., writer=...)``, which saves
      (δ, optimizer state, losses so far; a stream's position) and resumes from its latest checkpoint so
      that the resumed fit equals an uninterrupted one (minibatch order included).
    nonfinite_fix: the fix named when the objective becomes NaN or Inf (default: lower the learning
      rate); the fit then stops with `FloatingPointError`.

  Returns:
    (δ, history) with history['loss'] (steps,): the objective on each step's batch before its update,
    and for 'sgd' / 'adam' history['learning_rate'] (the one 'auto' chose). For 'exact': history['loss']
    = [L(δ*)], 'weight_decay' (λ; the chosen one for 'loo', with the grid's 'loo_loss' and
    'loo_accuracy'), 'relative_residual' (the certificate) and 'iterations'.
  """
  stream = train if isinstance(train, ImageStream) else None
  if options.optimizer == "exact":
    if stream is not None:
      raise ValueError("optimizer='exact' solves on cached training features: pass Features (cache_features="
                       "'always'), or use optimizer='quadratic' to stream images.")
    return _exact_fit(lin, variables, train, targets, options)
  batch_size = options.batch_size
  if stream is not None:
    if targets is not None or (options.preconditioner != preconditioners.NONE and curvature is None):
      raise ValueError("fit_linearized on an ImageStream takes its targets from the stream (targets=None) "
                       f"and needs a precomputed curvature with preconditioner={options.preconditioner!r} "
                       "(lqf.kfac.stream_factors).")
    batch_size = stream.batch_size
  else:
    losses.check_targets(targets, train.f0.shape)
  if options.preconditioner != preconditioners.NONE and curvature is None:
    curvature = curvature_of(options, lin, variables, train.h, targets.weights)
  delta = lin.init_delta(variables)
  if batch_size is None:
    batches = lambda start: itertools.repeat(None)  # noqa: E731
    sample = (train, targets)
  elif stream is None:
    batches = lambda start: minibatches(train.h, targets, batch_size, seed, start)  # noqa: E731
    first = next(batch_order(train.h.shape[0], batch_size, seed))
    sample = (Features(train.h[first], train.f0[first]), _rows(targets, first))
  else:
    batches, sample = _stream_batches(lin, variables, stream, peek=options.learning_rate == "auto"
                                      and options.optimizer == "sgd")
  if options.learning_rate == "auto" and options.optimizer == "sgd":
    options = dataclasses.replace(options, learning_rate=_auto_learning_rate(
        lin, variables, *sample, options, curvature))
  like = None if stream else (jax.ShapeDtypeStruct(train.f0.shape, jnp.float32), delta)
  tx = make_optimizer(options, curvature=curvature, sqrt_curvature_like=like)
  kw = dict(tx=tx, loss=options.loss)
  if batch_size is None:
    f0, jvp = jit_tangent(lin, variables, train.h)
    step = functools.partial(full_batch_step, **kw)
    args = (f0, jvp, targets, options.weight_decay)
  else:
    step = functools.partial(batch_step, lin=lin, from_images=stream is not None, **kw)
    args = (variables, options.weight_decay)
  carried = jnp.zeros(train.f0.shape, jnp.float32) if options.optimizer == "quadratic" else None
  result = run(step, guard.init(FitState(delta, tx.init(delta), carried)), batches, steps=options.steps,
               args=args, data_iterator=None if stream is None else stream.iterator,
               nonfinite_fix=nonfinite_fix or _learning_rate_fix(options))
  history = {"loss": result.losses}
  if options.optimizer != "quadratic":
    history["learning_rate"] = options.learning_rate
  return result.state.state.delta, history


def penalty_metric(options: FitOptions, lin: Linearized, variables: dict, h: jnp.ndarray,
                   weights: jnp.ndarray | None = None) -> metric_lib.Metric | None:
  """The metric M of ``options.regularizer`` at w0 from the training features h (weights c): the damped
  curvature of that registered preconditioner with μ = ``metric_damping`` (`lqf.metric`); None for
  'euclidean' (M = I)."""
  if options.regularizer == EUCLIDEAN:
    return None
  return metric_lib.of(curvature_of(options, lin, variables, h, weights, name=options.regularizer),
                       options.metric_damping)


def _exact_fit(lin: Linearized, variables: dict, train: Features, targets: losses.WeightedTargets,
               options: FitOptions) -> tuple[Params, dict[str, Any]]:
  """δ* of the objective of ``options`` by the certified solve; λ by leave-one-out for 'loo'.

  Few examples (N·C ≤ `lqf.solve.KERNEL_LIMIT`): the kernel K (K_M) from per-example Jacobians, one
  eigendecomposition (`lqf.influence.RidgePath`: the leave-one-out curve, then α at λ in float64),
  δ = M⁻¹JᵀC^½α, polished by CG preconditioned by M⁻¹ to the certificate (the kernel-form CG without a
  preconditioner for K_M needed 86–208 iterations on the demo's 25-shot problems). More examples: CG
  (`lqf.solve.solve_linearized`, "auto"); 'loo' needs the kernel.
  """
  losses.check_targets(targets, train.f0.shape)
  metric = penalty_metric(options, lin, variables, train.h, targets.weights)
  history: dict[str, Any] = {}
  weight_decay, start = options.weight_decay, None
  if train.f0.shape[0] * train.f0.shape[-1] <= solve.KERNEL_LIMIT:
    path = influence.ridge_path(lin, variables, train, targets, metric=metric,
                                batch_size=options.curvature_batch_size)
    if weight_decay == LOO:
      curve = path.loo_curve(targets)
      weight_decay = curve.best
      history.update(loo_loss=curve.loss, loo_accuracy=curve.accuracy)
      if weight_decay in (curve.weight_decays[0], curve.weight_decays[-1]):
        logger.warning("weight_decay='loo' chose λ = %g at the edge of the grid %g … %g.", weight_decay,
                       curve.weight_decays[0], curve.weight_decays[-1])
    start = path.fit(weight_decay).delta(lin, variables, train.h, metric)
  elif weight_decay == LOO:
    raise ValueError(f"weight_decay='loo' needs the kernel form, N·C ≤ {solve.KERNEL_LIMIT}, but N·C = "
                     f"{train.f0.shape[0] * train.f0.shape[-1]}: use a number (e.g. 1e-3).")
  delta, info = solve.solve_linearized(lin, variables, train, targets, weight_decay=weight_decay,
                                       metric=metric, tol=EXACT_TOL, maxiter=EXACT_MAXITER, x0=start,
                                       method="auto" if start is None else "parameter")  # no sketch
  if info.relative_residual > EXACT_TOL:
    logger.warning("optimizer='exact': relative residual %.2g after %d CG iterations (asked %g).",
                   info.relative_residual, info.iterations, EXACT_TOL)
  value = solve.objective(lin, variables, train, targets, weight_decay=weight_decay, metric=metric)(delta)
  history.update(loss=np.array([value]), weight_decay=weight_decay,
                 relative_residual=info.relative_residual, iterations=info.iterations)
  return delta, history


def _stream_batches(lin: Linearized, variables: dict, stream: ImageStream, *, peek: bool):
  """(batches(start), the first batch as (`Features`, targets) or None) of a streamed fit.

  With ``peek`` the first batch is read before the fit (for ``learning_rate='auto'``) and handed back as
  its first step's batch; a resumed fit (start > 0) restores the stream's position and reads on from it.
  """
  if not peek:
    return (lambda start: stream.target_batches()), None
  images, targets = next(stream.target_batches())
  h = jit_trunk(lin, variables, jnp.asarray(images))
  batches = lambda start: (itertools.chain([(images, targets)], stream.target_batches())  # noqa: E731
                           if start == 0 else stream.target_batches())
  return batches, (Features(h, jit_tail(lin, variables, h)), targets)


def minibatches(inputs: jnp.ndarray, targets: Any, batch_size: int, seed: int,
                start: int) -> Iterator[tuple[jnp.ndarray, Any]]:
  """The (inputs, targets) batches of steps start + 1, start + 2, ... of a minibatch fit: rows
  `batch_order` (N, batch_size, seed) of the cached ``inputs`` (N, ...) and of every leaf of ``targets``
  (`lqf.losses.WeightedTargets`, or labels (N,))."""
  n = inputs.shape[0]
  if batch_size > n:
    raise ValueError(f"batch_size={batch_size} exceeds the {n} training examples: use batch_size=None "
                     f"(full batch) or a smaller batch.")
  return ((inputs[idx], _rows(targets, idx))
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


def _rows(tree: Any, idx: np.ndarray) -> Any:
  """The rows ``idx`` of every leaf of ``tree`` (labels, `lqf.losses.WeightedTargets` or None)."""
  return jax.tree.map(lambda a: a[idx], tree)


_apply = jax.jit(Linearized.apply, static_argnums=0)


def predict(lin: Linearized, variables: dict, delta: Params, h: jnp.ndarray,
            batch_size: int = inference.EVAL_BATCH_SIZE) -> jnp.ndarray:
  """f_lin(x; δ) (N, C) from cached trunk features h (N, ...), ``batch_size`` examples at a time."""
  return inference.apply_batched(_apply, h, args=(lin, delta, variables), batch_size=batch_size)


def evaluate(lin: Linearized, variables: dict, delta: Params, features: Features,
             labels: jnp.ndarray) -> float:
  """Accuracy of argmax f_lin(x; δ) on (features, labels)."""
  logits = predict(lin, variables, delta, features.h)
  return float(jnp.mean(jnp.argmax(logits, -1) == labels))
