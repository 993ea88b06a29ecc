"""Exact resume after SIGKILL: the killed-and-rerun pretraining equals an uninterrupted one, bit for bit.

The checkpoint holds the parameters, batch statistics, optimizer state, the divergence guard's record
and the grain iterator's position, so the rerun sees the same batches in the same order; metric rows
logged after the last checkpoint by the killed run are dropped on resume. A half-written checkpoint
(orbax's ``<step>.orbax-checkpoint-tmp-*`` directory) is never loaded and is deleted by the rerun.
Measured: max |Δparam| = 0, identical metric rows and final metrics.
"""

import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from lqf.runtime import checkpoint as ckpt_lib
from lqf.runtime.metric_writer import read_metrics
from test_train import ROOT, pretrain_command, pretrain_env

STEPS = 120
CHECKPOINT_EVERY = 10


def _start(workdir):
  return subprocess.Popen(pretrain_command(STEPS, CHECKPOINT_EVERY, f"--workdir={workdir}"),
                          env=pretrain_env(), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def finished_steps(workdir) -> list[int]:
  """The complete checkpoint steps in ``workdir/checkpoints``."""
  directory = os.path.join(workdir, "checkpoints")
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(int(n) for n in names if n.isdigit())


def kill_after_first_checkpoint(victim: subprocess.Popen, workdir: str, steps: int) -> list[int]:
  """SIGKILLs ``victim`` as soon as ``workdir`` holds a checkpoint; returns the steps saved by then
  (failing if the run ended first, or had finished all ``steps``: the test would prove nothing)."""
  deadline = time.monotonic() + 600
  while not finished_steps(workdir):
    assert victim.poll() is None, victim.communicate()[0][-3000:]
    assert time.monotonic() < deadline
    time.sleep(0.01)
  os.kill(victim.pid, signal.SIGKILL)
  victim.wait()
  saved = finished_steps(workdir)
  assert saved[-1] < steps, "the run finished before the kill: the test proves nothing"
  return saved


def _rows(workdir) -> list[dict]:
  """Metric rows without the (timing-dependent) throughput."""
  return [{k: v for k, v in row.items() if k != "examples_per_sec"}
          for row in read_metrics(os.path.join(workdir, "metrics.jsonl"))]


@pytest.mark.slow
def test_run_killed_with_sigkill_resumes_exactly(tmp_path):
  full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
  uninterrupted, victim = _start(full), _start(killed)
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
  out, _ = uninterrupted.communicate(timeout=600)
  assert uninterrupted.returncode == 0, out[-3000:]

  a, _ = ckpt_lib.load_pretrained(full)
  b, _ = ckpt_lib.load_pretrained(killed)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)  # max |Δ| = 0
  assert _rows(killed) == _rows(full)
  assert len([r for r in _rows(full) if "train_loss" in r]) == STEPS
  finals = []
  for workdir in (full, killed):
    with open(os.path.join(workdir, "final.json")) as f:
      finals.append(json.load(f))
  assert finals[0] == finals[1]
