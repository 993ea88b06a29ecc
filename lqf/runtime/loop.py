"""The one training loop: a jitted step over batches, with resume, a divergence guard, metrics and progress.

Pretraining and the compat members (`lqf.train`), the linearized fit (`lqf.fit`), nonlinear fine-tuning
(`lqf.finetune`) and the text models all run through `run`. What differs between them is the *update*

  update(state, batch, *args, step) -> (state, metrics),   metrics['loss'] a scalar (and optionally
                                                           'grad_norm'),

a pure function of the caller's state (any pytree: parameters and optimizer state, δ and K-FAC state, …),
one batch (a pytree, or None for a full-batch fit whose data are in ``args``), arguments that are the same
on every step (frozen variables, cached features, a teacher's variables) and the step index (e.g. to fold
into a dropout key). `guarded` turns it into the step that `run` calls:

  step(LoopState, batch, *args) -> (LoopState, metrics),   LoopState = (step, state, guard),

which the caller jits (with its shardings, static arguments and ``donate_argnums=0``).

Divergence guard. Inside the step, ``ok = all(isfinite(floating leaves of the batch)) ∧ isfinite(loss) ∧
isfinite(grad_norm)``; when not ok the update is not applied (the old state is selected) and `Guard`
records the step and its cause. The host reads that record only at log, evaluation and checkpoint steps
and after the last step (points where it synchronises anyway: a read on every step would stall the
asynchronous dispatch of the next ones): the run then raises `FloatingPointError` naming the step and the
caller's fix, before anything after the bad step is saved, so the last checkpoint is the last good state
(after the first bad step no update is applied, so the steps up to that check only cost time). With
``skip_nonfinite`` bad batches are skipped instead and counted (``skipped_steps``).

Interrupts. After every step `run` looks for a SIGINT/SIGTERM recorded by `lqf.runtime.interrupt`; it then saves
a checkpoint at that step (when it has checkpoints and the state is finite) and raises
`lqf.runtime.interrupt.Interrupted` naming the step and what a rerun resumes from.

Resume. With ``checkpoints`` (`lqf.runtime.checkpoint.RunCheckpoints`) the loop state, the per-step losses and
the position of a grain ``data_iterator`` are saved at the checkpoints' interval and after the last step;
`run` restores the latest checkpoint first, so a rerun continues from there and ends with the numbers of
an uninterrupted run (``batches(start)`` must yield the batches of steps start + 1, start + 2, …).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lqf.runtime import interrupt
from lqf.runtime.checkpoint import RunCheckpoints
from lqf.runtime.metric_writer import MetricWriter, Progress

INPUT_NONFINITE, LOSS_NONFINITE = 1, 2


@flax.struct.dataclass
class Guard:
  """The divergence guard's record (int32 scalars, saved with the state)."""
  count: jax.Array       # steps whose update was not applied
  first_step: jax.Array  # the first such step, 0 if none
  first_cause: jax.Array  # its cause: INPUT_NONFINITE or LOSS_NONFINITE (0 if none)

  @classmethod
  def none(cls) -> Guard:
    zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731  (three buffers: the state is donated)
    return cls(count=zero(), first_step=zero(), first_cause=zero())


@flax.struct.dataclass
class LoopState:
  """Steps done, the caller's state, and the guard's record."""
  step: jax.Array
  state: Any
  guard: Guard


def init(state: Any) -> LoopState:
  """The loop state before the first step."""
  return LoopState(step=jnp.zeros((), jnp.int32), state=state, guard=Guard.none())


def _inputs_finite(batch: Any) -> jax.Array:
  """True when every floating-point leaf of ``batch`` is finite (True for None)."""
  ok = jnp.array(True)
  for leaf in jax.tree.leaves(batch):
    if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
      ok &= jnp.all(jnp.isfinite(leaf))
  return ok


def guarded(update: Callable[..., tuple[Any, dict]], *, skip_nonfinite: bool = False):
  """``update(state, batch, *args, step) -> (state, metrics)`` as a guarded loop step (module docstring).

  The step returns ``metrics`` with ``skipped_steps`` (updates not applied so far) added. Jit the result;
  ``functools.wraps`` keeps ``update``'s signature, so its keyword arguments can be static.
  """
  @functools.wraps(update)
  def step(loop_state: LoopState, batch: Any, *args, **kwargs):
    new, metrics = update(loop_state.state, batch, *args, step=loop_state.step, **kwargs)
    inputs_ok = _inputs_finite(batch)
    ok = inputs_ok & jnp.isfinite(metrics["loss"])
    if "grad_norm" in metrics:
      ok &= jnp.isfinite(metrics["grad_norm"])
    guard = loop_state.guard
    apply = ok if skip_nonfinite else ok & (guard.first_step == 0)
    state = jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, loop_state.state)
    number = loop_state.step + 1
    first = (guard.first_step == 0) & ~ok
    guard = Guard(count=guard.count + (~ok).astype(jnp.int32),
                  first_step=jnp.where(first, number, guard.first_step),
                  first_cause=jnp.where(first, jnp.where(inputs_ok, LOSS_NONFINITE, INPUT_NONFINITE),
                                        guard.first_cause))
    return LoopState(step=number, state=state, guard=guard), {**metrics, "skipped_steps": guard.count}
  return step


class Stopped(NamedTuple):
  """What the divergence guard recorded, for the caller's message (`run`'s ``nonfinite_fix``)."""
  step: int      # the first non-finite step
  inputs: bool   # True: the batch held NaN/Inf; False: the loss or gradient did


def check_guard(state: LoopState, checkpoints: RunCheckpoints | None, fix: Callable[[Stopped], str],
                inputs: str = "training inputs") -> None:
  """Raises `FloatingPointError` naming the first non-finite step, the kept checkpoint and ``fix``.

  ``inputs`` names what a batch holds in the message (e.g. "training images").
  """
  step, cause = (int(x) for x in jax.device_get((state.guard.first_step, state.guard.first_cause)))
  if not step:
    return
  if checkpoints is not None:
    checkpoints.wait()
  last = None if checkpoints is None else checkpoints.latest_step()
  kept = (f"the last good checkpoint is step {last} in {checkpoints.directory}" if last is not None
          else "no checkpoint had been written")
  stopped = Stopped(step, cause == INPUT_NONFINITE)
  what = f"the {inputs} hold NaN or Inf" if stopped.inputs else "the loss or gradient is NaN or Inf"
  raise FloatingPointError(f"{what} at step {step}: the run stopped without saving a later state and "
                           f"{kept}; {fix(stopped)}.")


class Result(NamedTuple):
  """What `run` returns."""
  state: LoopState
  losses: np.ndarray       # (steps,) float32: the loss of every step (the batch's, before its update)
  evaluation: dict         # the last `evaluate` metrics ({} if it never ran)


def _restore(checkpoints: RunCheckpoints | None, state: LoopState, steps: int,
             data_iterator: Any) -> tuple[LoopState, np.ndarray]:
  """The latest checkpoint's (state, losses), or (state, zeros); ``data_iterator`` moved in place."""
  losses = np.zeros((steps,), np.float32)
  if checkpoints is None or checkpoints.latest_step() is None:
    return state, losses
  latest = int(checkpoints.latest_step())
  if latest > steps:
    raise ValueError(f"{checkpoints.directory} holds step {latest}, beyond the run's {steps} steps: use "
                     "a new --workdir or --config.overwrite=True.")
  saved = checkpoints.restore({"loop": state, "loss": losses}, data_iterator=data_iterator)
  logging.info("resumed from step %d in %s", latest, checkpoints.directory)
  return saved["loop"], np.asarray(saved["loss"], np.float32)


def _losses(history: np.ndarray, values: list, start: int) -> np.ndarray:
  """``history`` with the device scalars ``values`` of steps start + 1, … written in (one transfer)."""
  out = np.array(history, np.float32)
  if values:
    out[start:start + len(values)] = np.asarray(jnp.stack(values), np.float32)
  return out


def run(step: Callable, state: LoopState, batches: Callable[[int], Iterable[Any]], *, steps: int,
        args: tuple = (), checkpoints: RunCheckpoints | None = None, data_iterator: Any = None,
        meta: dict | None = None, nonfinite_fix: Callable[[Stopped], str] = lambda s: "check the data",
        inputs: str = "training inputs", skip_nonfinite: bool = False, writer: MetricWriter | None = None,
        progress: Progress | None = None, evaluate: Callable[[LoopState], dict] | None = None,
        eval_every: int = 0) -> Result:
  """Runs ``step`` until ``steps`` steps are done, resuming from ``checkpoints``; see the module docstring.

  Args:
    step: the jitted `guarded` step, ``step(state, batch, *args) -> (state, metrics)``.
    state: the initial `LoopState` (`init`), also the template a checkpoint is restored into.
    batches: ``batches(start)`` yields the batches of steps start + 1, … (None for a full-batch step).
    steps: the total number of steps.
    args: the step's other arguments, the same on every step.
    checkpoints: where the state is saved (its interval, and after the last step) and resumed from.
    data_iterator: a grain iterator that ``batches`` reads; its position is saved and restored.
    meta: JSON saved with every checkpoint (e.g. the run's config).
    nonfinite_fix: the fix named when the guard stops the run (e.g. "lower config.optim.lr (now 3.0)").
    inputs: what a batch holds, for that message (e.g. "training images").
    skip_nonfinite: the step skips bad batches (`guarded`'s flag): do not stop.
    writer: ``train_<metric>`` rows at each progress line, ``test_<metric>`` rows at each evaluation.
    progress: logs step/total, loss, throughput and ETA at its interval (and feeds ``writer``).
    evaluate: ``evaluate(state) -> metrics``, every ``eval_every`` steps (0: only after the last).

  Returns:
    `Result`: the final state, the losses of all steps and the last evaluation.
  """
  state, history = _restore(checkpoints, state, steps, data_iterator)
  start = int(state.step)
  values: list = []
  evaluation: dict = {}
  for number, batch in zip(range(start + 1, steps + 1), batches(start)):
    state, metrics = step(state, batch, *args)
    values.append(metrics["loss"])
    last = number == steps
    log = progress is not None and progress.due(number)
    evaluate_now = evaluate is not None and (last or (eval_every and number % eval_every == 0))
    save = checkpoints is not None and (last or checkpoints.should_save(number))
    if not skip_nonfinite and (log or evaluate_now or save or last):
      check_guard(state, checkpoints, nonfinite_fix, inputs)
    if log:
      metrics = jax.device_get(metrics)
      rates = progress(number, float(metrics["loss"]))
      if writer is not None:
        writer.write(number, **{f"train_{k}": v for k, v in metrics.items()}, **rates)
    if evaluate_now:
      evaluation = evaluate(state)
      logging.info("%sstep %d  %s", progress.label if progress else "", number,
                   "  ".join(f"test {k} {v:.4f}" for k, v in evaluation.items()))
      if writer is not None:
        writer.write(number, **{f"test_{k}": v for k, v in evaluation.items()})
    if save:
      checkpoints.save(number, {"loop": state, "loss": _losses(history, values, start)},
                       data_iterator=data_iterator, meta=meta, force=last)
    if interrupt.requested() and not last:
      _stop(state, number, steps, checkpoints, data_iterator, meta, history, values, start, progress,
            saved=save, checked=skip_nonfinite or log or evaluate_now or save)
  return Result(state, _losses(history, values, start), evaluation)


def _stop(state: LoopState, number: int, steps: int, checkpoints: RunCheckpoints | None,
          data_iterator: Any, meta: dict | None, history: np.ndarray, values: list, start: int,
          progress: Progress | None, *, saved: bool, checked: bool) -> None:
  """Saves the state of step ``number`` (unless non-finite) and raises `lqf.runtime.interrupt.Interrupted`."""
  label = f" of {progress.label.strip()}" if progress is not None and progress.label else ""
  resume = None
  if checkpoints is not None:
    finite = checked or not int(jax.device_get(state.guard.first_step))
    if finite and not saved:
      checkpoints.save(number, {"loop": state, "loss": _losses(history, values, start)},
                       data_iterator=data_iterator, meta=meta, force=True)
    checkpoints.wait()
    latest = checkpoints.latest_step()
    resume = None if latest is None else f"step {latest}"
  interrupt.check(f"at step {number}/{steps}{label}", resume)
