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

from lqf import cli, train


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) and writes ``final.json`` with the test metrics; returns them."""
  _, metrics = train.train(config, workdir, label="pretrain")
  logging.info("final test accuracy %.4f", metrics["accuracy"])
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "final.json"), "w") as f:
      json.dump(metrics, f, indent=2)
  return metrics


if __name__ == "__main__":
  cli.launch(run)
