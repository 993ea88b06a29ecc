"""Exact resume after SIGKILL: the killed-and-rerun pretraining equals an uninterrupted one, bit for bit.

The checkpoint holds the parameters, batch statistics, optimizer state, the divergence guard's record
and the grain iterator's position, so the rerun sees the same batches in the same order; metric rows
logged after the last checkpoint by the killed run are dropped on resume. A half-written checkpoint
(orbax's ``<step>.orbax-checkpoint-tmp-*`` directory) is never loaded and is deleted by the rerun.
Measured: max |Δparam| = 0, identical metric rows and final metrics.
"""

import json
import os
import subprocess

import jax
import numpy as np
import pytest

from lqf.runtime import checkpoint as ckpt_lib
from support import (
    CHECKPOINT_EVERY, ROOT, STEPS, kill_after_first_checkpoint, metric_rows, pretrain_command, pretrain_env,
    start_pretraining)


@pytest.mark.slow
def test_run_killed_with_sigkill_resumes_exactly(tmp_path, uninterrupted_pretraining):
  full, killed = uninterrupted_pretraining, str(tmp_path / "killed")
  victim = start_pretraining(killed)
  steps_at_kill = kill_after_first_checkpoint(victim, killed, STEPS)

  # A checkpoint left half-written by a kill: a higher step that must be neither loaded nor kept.
  partial = os.path.join(killed, "checkpoints", f"{STEPS - 1}.orbax-checkpoint-tmp-1700000000")
  os.makedirs(os.path.join(partial, "state"))
  with open(os.path.join(partial, "state", "garbage"), "wb") as f:
    f.write(os.urandom(64))

  rerun = subprocess.run(pretrain_command(STEPS, CHECKPOINT_EVERY, f"--workdir={killed}"),
                         env=pretrain_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  resumed_from = int(rerun.stderr.split("resumed from step ")[1].split()[0])
  assert resumed_from == steps_at_kill[-1]
  assert not os.path.exists(partial)

  a, _ = ckpt_lib.load_pretrained(full)
  b, _ = ckpt_lib.load_pretrained(killed)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)  # max |Δ| = 0
  assert metric_rows(killed) == metric_rows(full)
  assert len([r for r in metric_rows(full) if "train_loss" in r]) == STEPS
  finals = []
  for workdir in (full, killed):
    with open(os.path.join(workdir, "final.json")) as f:
      finals.append(json.load(f))
  assert finals[0] == finals[1]
