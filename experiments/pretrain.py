"""Pretrains a classifier (the source model LQF fine-tunes).

  python -m experiments.pretrain --config configs/pretrain_mnist.py --workdir /tmp/pretrain_mnist

Writes ``final.json`` with the test metrics next to the run's checkpoints and ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
from absl import logging

from lqf import train
from lqf.runtime import cli


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) and writes ``final.json`` with the test metrics; returns them."""
  state, metrics = train.train(config, workdir, label="pretrain")
  final = os.path.join(workdir, "final.json")
  if jax.process_index() == 0:
    with open(f"{final}.tmp", "w") as f:
      json.dump(metrics, f, indent=2)
    os.replace(f"{final}.tmp", final)
  logging.info("pretrain: test accuracy %.4f, loss %.4f after %d steps; wrote %s, %s, %s and the "
               "TensorBoard events in %s", metrics["accuracy"], metrics["loss"], int(state.step), final,
               os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "checkpoints"),
               os.path.join(workdir, "tensorboard"))
  return metrics


if __name__ == "__main__":
  cli.launch(run)
