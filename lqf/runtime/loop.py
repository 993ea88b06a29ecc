"""The one training loop: a jitted step over batches, with resume, a divergence guard, metrics and progress.

Pretraining and the compat members (`lqf.train`), the linearized fit (`lqf.fit`, passed as its ``run``),
nonlinear fine-tuning (`lqf.nonlinear`) and the text models all run through `run`. The step is
`lqf.guard.guarded`'s: ``step(LoopState, batch, *args) -> (LoopState, metrics)``, jitted by the caller
(with its shardings, static arguments and ``donate_argnums=0``); `lqf.guard` describes the update it wraps
and the divergence guard inside it. `lqf.guard.run_steps` is the same loop without anything below.

Divergence guard. The host reads the guard's record only at log, evaluation and checkpoint steps and
after the last step (points where it synchronises anyway: a read on every step would stall the
asynchronous dispatch of the next ones): the run then raises `FloatingPointError` naming the step and the
caller's fix, before anything after the bad step is saved, so the last checkpoint is the last good state
(after the first bad step no update is applied, so the steps up to that check only cost time). With
``skip_nonfinite`` bad batches are skipped instead and counted (``skipped_steps``).

Interrupts. After every step `run` looks for a SIGINT/SIGTERM recorded by `lqf.runtime.interrupt`; it
then saves a checkpoint at that step (when it has checkpoints and the state is finite) and raises
`lqf.runtime.interrupt.Interrupted` naming the step and what a rerun resumes from.

Resume. With ``checkpoints`` (`lqf.runtime.checkpoint.RunCheckpoints`) the loop state, the per-step
losses and the position of a grain ``data_iterator`` are saved at the checkpoints' interval and after the
last step; `run` restores the latest checkpoint first, so a rerun continues from there and ends with the
numbers of an uninterrupted run (``batches(start)`` must yield the batches of steps start + 1, start + 2, …).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lqf import guard
from lqf.runtime import interrupt
from lqf.runtime.checkpoint import RunCheckpoints
from lqf.runtime.metric_writer import MetricWriter, Progress

def check_guard(state: guard.LoopState, checkpoints: RunCheckpoints | None,
                fix: Callable[[guard.Stopped], str], inputs: str = "training inputs") -> None:
  """Raises `lqf.guard.nonfinite_error` naming the first non-finite step, the kept checkpoint and ``fix``.

  ``inputs`` names what a batch holds in the message (e.g. "training images").
  """
  stopped = guard.stopped(state)
  if stopped is None:
    return
  if checkpoints is not None:
    checkpoints.wait()
  last = None if checkpoints is None else checkpoints.latest_step()
  kept = (f"the last good checkpoint is step {last} in {checkpoints.directory}" if last is not None
          else "no checkpoint had been written")
  raise guard.nonfinite_error(stopped, fix, inputs, kept)


class Result(NamedTuple):
  """What `run` returns (`lqf.guard.Result` and the evaluation)."""
  state: guard.LoopState
  losses: np.ndarray       # (steps,) float32: the loss of every step (the batch's, before its update)
  evaluation: dict         # the last `evaluate` metrics ({} if it never ran)


def _restore(checkpoints: RunCheckpoints | None, state: guard.LoopState, steps: int,
             data_iterator: Any) -> tuple[guard.LoopState, np.ndarray]:
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


def run(step: Callable, state: guard.LoopState, batches: Callable[[int], Iterable[Any]], *, steps: int,
        args: tuple = (), checkpoints: RunCheckpoints | None = None, data_iterator: Any = None,
        meta: dict | None = None, nonfinite_fix: Callable[[guard.Stopped], str] = lambda s: "check the data",
        inputs: str = "training inputs", skip_nonfinite: bool = False, writer: MetricWriter | None = None,
        progress: Progress | None = None, evaluate: Callable[[guard.LoopState], dict] | None = None,
        eval_every: int = 0) -> Result:
  """Runs ``step`` until ``steps`` steps are done, resuming from ``checkpoints``; see the module docstring.

  Args:
    step: the jitted `guarded` step, ``step(state, batch, *args) -> (state, metrics)``.
    state: the initial `lqf.guard.LoopState` (`lqf.guard.init`), also the template a checkpoint is restored into.
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


def _stop(state: guard.LoopState, number: int, steps: int, checkpoints: RunCheckpoints | None,
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
