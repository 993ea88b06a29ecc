"""The divergence-guarded step and the plain loop that runs it: what a fit needs, without the runtime.

What differs between the training runs of this package (a linearized fit, nonlinear fine-tuning,
pretraining) is the *update*

  update(state, batch, *args, step) -> (state, metrics),   metrics['loss'] a scalar (and optionally
                                                           'grad_norm'),

a pure function of the caller's state (any pytree: parameters and optimizer state, δ and K-FAC state, …),
one batch (a pytree, or None for a full-batch fit whose data are in ``args``), arguments that are the same
on every step (frozen variables, cached features, a teacher's variables) and the step index (e.g. to fold
into a dropout key). `guarded` turns it into a loop step

  step(LoopState, batch, *args) -> (LoopState, metrics),   LoopState = (step, state, guard),

which the caller jits (with its static arguments and ``donate_argnums=0``).

Divergence guard. Inside the step, ``ok = all(isfinite(floating leaves of the batch)) ∧ isfinite(loss) ∧
isfinite(grad_norm)``; when not ok the update is not applied (the old state is selected) and `Guard`
records the step and its cause; a loop reads it (`stopped`) and raises `nonfinite_error`.

Loops. `run_steps` runs the steps and checks the guard after the last one: what a fit inside the user's
own code needs. `lqf.runtime.loop.run` takes the same arguments and adds resume from checkpoints,
interrupts, metrics and progress; a fit takes either as its ``run`` (`lqf.fit.fit_linearized`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

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


def stopped(state: LoopState) -> Stopped | None:
  """What the guard of ``state`` recorded, or None when every step so far was finite (reads the device)."""
  step, cause = (int(x) for x in jax.device_get((state.guard.first_step, state.guard.first_cause)))
  return Stopped(step, cause == INPUT_NONFINITE) if step else None


def nonfinite_error(stopped: Stopped, fix: Callable[[Stopped], str], inputs: str = "training inputs",
                    kept: str = "no checkpoint had been written") -> FloatingPointError:
  """The one-line error of a run stopped by the guard: the step, what was not finite, ``kept`` (which
  checkpoint survives) and the caller's ``fix``; ``inputs`` names what a batch holds."""
  what = f"the {inputs} hold NaN or Inf" if stopped.inputs else "the loss or gradient is NaN or Inf"
  return FloatingPointError(f"{what} at step {stopped.step}: the run stopped without saving a later state "
                            f"and {kept}; {fix(stopped)}.")


class Result(NamedTuple):
  """What `run_steps` returns."""
  state: LoopState
  losses: np.ndarray       # (steps,) float32: the loss of every step (the batch's, before its update)


def run_steps(step: Callable, state: LoopState, batches: Callable[[int], Iterable[Any]], *, steps: int,
              args: tuple = (), data_iterator: Any = None,
              nonfinite_fix: Callable[[Stopped], str] = lambda s: "check the data") -> Result:
  """Runs the jitted `guarded` ``step`` for ``steps`` steps over ``batches(0)`` (None per step for a
  full-batch step) with ``args``; raises `nonfinite_error` after the last step if the guard stopped it.
  ``data_iterator`` (the one ``batches`` reads) is accepted for `lqf.runtime.loop.run`'s signature."""
  del data_iterator
  values = []
  for _, batch in zip(range(steps), batches(0)):
    state, metrics = step(state, batch, *args)
    values.append(metrics["loss"])
  bad = stopped(state)
  if bad is not None:
    raise nonfinite_error(bad, nonfinite_fix)
  return Result(state, np.asarray(jnp.stack(values), np.float32))
