"""Stopped runs resume exactly: SIGINT / SIGTERM, and SIGKILL, against one uninterrupted run (the
`uninterrupted_pretraining` fixture, computed once for both tests here).

SIGINT / SIGTERM stop a run at a safe point (`lqf.runtime.interrupt`): one line naming the step and what a rerun
resumes from, exit status 130 / 143, no traceback, a checkpoint at that step; the rerun resumes there and
ends with the numbers of an uninterrupted run.

Exact resume after SIGKILL: the killed-and-rerun pretraining equals an uninterrupted one, bit for bit.

The checkpoint holds the parameters, batch statistics, optimizer state, the divergence guard's record
and the grain iterator's position, so the rerun sees the same batches in the same order; metric rows
logged after the last checkpoint by the killed run are dropped on resume. A half-written checkpoint
(orbax's ``<step>.orbax-checkpoint-tmp-*`` directory) is never loaded and is deleted by the rerun.
Measured: max |Δparam| = 0, identical metric rows and final metrics.
"""

import json
import os
import re
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from lqf.runtime import checkpoint as ckpt_lib
from support import (CHECKPOINT_EVERY, ROOT, STEPS, finished_steps, kill_after_first_checkpoint, metric_rows,
                     pretrain_command, pretrain_env, start_pretraining)


@pytest.mark.slow
def test_signals_stop_at_a_safe_point_and_the_rerun_resumes(tmp_path, uninterrupted_pretraining):
  """SIGINT stops the run, SIGTERM stops its rerun (each after a new checkpoint), a third run finishes:
  the same parameters' metrics and metric rows as the uninterrupted run."""
  stopped = str(tmp_path / "stopped")
  command = pretrain_command(STEPS, CHECKPOINT_EVERY, f"--workdir={stopped}")
  resumed_from = None
  for signum, status in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
    before = finished_steps(stopped)
    victim = subprocess.Popen(command, env=pretrain_env(), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while finished_steps(stopped) == before:  # stop it mid-run, after a new checkpoint
      assert victim.poll() is None, victim.communicate()[1][-3000:]
      assert time.monotonic() < deadline
      time.sleep(0.01)
    victim.send_signal(signum)
    _, err = victim.communicate(timeout=600)
    assert victim.returncode == status, err[-3000:]
    assert "Traceback" not in err
    if resumed_from is not None:
      assert f"resumed from step {resumed_from}" in err
    last = err.strip().splitlines()[-1]
    match = re.fullmatch(r"error: interrupted at step (\d+)/(\d+) of pretrain; rerun the same command to "
                         r"resume from step (\d+)\.", last)
    assert match, last
    step, total, resumed_from = map(int, match.groups())
    assert total == STEPS and step == resumed_from < STEPS and finished_steps(stopped)[-1] == step
    assert not [n for n in os.listdir(stopped) if n.endswith(".tmp") or n == ".lock"]
  rerun = subprocess.run(command, env=pretrain_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"resumed from step {resumed_from}" in rerun.stderr
  with open(os.path.join(uninterrupted_pretraining, "final.json")) as a, \
       open(os.path.join(stopped, "final.json")) as b:
    assert json.load(a) == json.load(b)
  assert metric_rows(uninterrupted_pretraining) == metric_rows(stopped)


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
