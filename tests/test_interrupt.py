"""SIGINT / SIGTERM stop a run at a safe point (`lqf.runtime.interrupt`): one line naming the step and what a rerun
resumes from, exit status 130 / 143, no traceback, a checkpoint at that step; the rerun resumes there and
ends with the numbers of an uninterrupted run."""

import json
import os
import re
import signal
import subprocess
import time

import pytest

from support import CHECKPOINT_EVERY, ROOT, STEPS, finished_steps, metric_rows, pretrain_command, pretrain_env


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
