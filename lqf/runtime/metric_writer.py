"""Metrics as JSON lines and TensorBoard scalars (process 0 only), and progress lines with throughput and ETA.

The JSON lines (``workdir/metrics.jsonl``) are the source of truth; the same scalars go to
``workdir/tensorboard/`` (tensorboardX: no TensorFlow), so ``tensorboard --logdir <workdir>`` works on
any workdir (local paths; a resumed run purges the events after its resume step).
"""

from __future__ import annotations

import json
import math
import time

import jax
import tensorboardX
from absl import logging

from lqf.runtime.checkpoint import as_path


class MetricWriter:
  """``{"step": s, **metrics}`` rows in ``workdir/<name>`` (JSON lines), written by process 0.

  Every `write` rewrites the file (a temporary file renamed over it), so the file is whole after a kill
  at any moment, and object stores that cannot append work too. Rows logged after ``resume_step`` by
  an interrupted run are dropped at the first write (nothing is touched before it), so after a resume
  the file holds exactly the rows of an uninterrupted run.
  """

  def __init__(self, workdir: str, name: str = "metrics.jsonl", *, resume_step: int):
    self.path = as_path(workdir) / name
    self._workdir, self._resume_step = workdir, resume_step
    self._active = jax.process_index() == 0
    self._lines: list[str] | None = None  # read at the first write: nothing is touched before
    self._board = None

  def _open(self) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._lines = []
    if self.path.exists():
      self._lines = [json.dumps(row) for row in _rows(self.path.read_text())
                     if row["step"] <= self._resume_step]
    if "://" not in str(self._workdir):
      self._board = tensorboardX.SummaryWriter(
          str(as_path(self._workdir) / "tensorboard"),
          purge_step=self._resume_step + 1 if self._resume_step else None)

  def write(self, step: int, **metrics: float) -> None:
    if not self._active:
      return
    if self._lines is None:
      self._open()
    values = {k: float(v) for k, v in metrics.items()}
    self._lines.append(json.dumps({"step": int(step), **values}))
    self._flush()
    if self._board is not None:
      for key, value in values.items():
        if math.isfinite(value):
          self._board.add_scalar(key, value, int(step))
      self._board.flush()

  def close(self) -> None:
    """Closes the TensorBoard event file (the JSON lines are always complete)."""
    if self._board is not None:
      self._board.close()
      self._board = None

  def _flush(self) -> None:
    tmp = self.path.parent / f"{self.path.name}.tmp"
    tmp.write_text("".join(line + "\n" for line in self._lines))
    tmp.replace(self.path)


def _rows(text: str) -> list[dict]:
  """The rows of a JSON-lines text; a line cut short (by a kill during an append) is skipped."""
  rows = []
  for line in text.splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return rows


def read_metrics(path: str) -> list[dict]:
  """All rows of a JSON-lines metrics file."""
  return _rows(as_path(path).read_text())


class Progress:
  """Logs ``<label> step s/T  loss  examples/s  ETA`` every ``every`` steps and after the last.

  Args:
    total_steps: T.
    examples_per_step: the (global) batch size, for the throughput.
    every: the interval in steps (≥ 1).
    first_step: the step the run starts after (a resumed run's), so the first rate is right.
    label: what runs (e.g. "pretrain", "fit lqf"), at the start of every line.
  """

  def __init__(self, total_steps: int, examples_per_step: int, every: int, first_step: int = 0,
               label: str = ""):
    self.total, self.batch, self.every = total_steps, examples_per_step, max(1, every)
    self.label = f"{label}  " if label else ""
    self._t, self._step = time.perf_counter(), first_step

  def due(self, step: int) -> bool:
    """Whether a line is logged at ``step``."""
    return step % self.every == 0 or step == self.total

  def __call__(self, step: int, loss: float) -> dict[str, float]:
    """Logs the line of ``step``; returns ``{'examples_per_sec': ...}`` for the metrics file."""
    now = time.perf_counter()
    rate = (step - self._step) / max(now - self._t, 1e-9)
    self._t, self._step = now, step
    eta = (self.total - step) / max(rate, 1e-9)
    logging.info("%sstep %d/%d  loss %.4f  %.0f examples/s  ETA %.0fs", self.label, step, self.total,
                 loss, rate * self.batch, eta)
    return {"examples_per_sec": rate * self.batch}
