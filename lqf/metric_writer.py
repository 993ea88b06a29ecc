"""Metrics as JSON lines (process 0 only) and progress lines with throughput and ETA."""

from __future__ import annotations

import json
import os
import time

import jax
from absl import logging


class MetricWriter:
  """Appends ``{"step": s, **metrics}`` lines to ``workdir/<name>`` on process 0."""

  def __init__(self, workdir: str, name: str = "metrics.jsonl"):
    self.path = os.path.join(workdir, name)
    self._active = jax.process_index() == 0

  def write(self, step: int, **metrics: float) -> None:
    if not self._active:
      return
    row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")


def read_metrics(path: str) -> list[dict]:
  """All rows of a JSON-lines metrics file."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """Logs ``step, loss, images/s, ETA`` every ``every`` steps."""

  def __init__(self, total_steps: int, global_batch: int, every: int, first_step: int = 0):
    self.total, self.batch, self.every = total_steps, global_batch, max(1, every)
    self._t, self._step = time.perf_counter(), first_step

  def __call__(self, step: int, loss: float) -> dict[str, float] | None:
    if step % self.every and step != self.total:
      return None
    now = time.perf_counter()
    rate = (step - self._step) / max(now - self._t, 1e-9)
    self._t, self._step = now, step
    eta = (self.total - step) / max(rate, 1e-9)
    logging.info("step %d/%d  loss %.4f  %.0f images/s  ETA %.0fs", step, self.total, loss,
                 rate * self.batch, eta)
    return {"images_per_sec": rate * self.batch}
