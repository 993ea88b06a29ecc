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

from support import ROOT, STEPS, finished_steps, metric_rows, pretrain_command, pretrain_env


@pytest.mark.slow
@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["sigint", "sigterm"])
def test_signal_stops_at_a_safe_point_and_the_rerun_resumes(tmp_path, signum, status):
  full, stopped = str(tmp_path / "full"), str(tmp_path / "stopped")
  command = lambda w: pretrain_command(STEPS, 10, f"--workdir={w}")  # noqa: E731
  victim = subprocess.Popen(command(stopped), env=pretrain_env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 600
  while not finished_steps(stopped):  # stop it mid-run, after its first checkpoint
    assert victim.poll() is None, victim.communicate()[1][-3000:]
    assert time.monotonic() < deadline
    time.sleep(0.01)
  victim.send_signal(signum)
  _, err = victim.communicate(timeout=600)
  assert victim.returncode == status, err[-3000:]
  assert "Traceback" not in err
  last = err.strip().splitlines()[-1]
  match = re.fullmatch(r"error: interrupted at step (\d+)/(\d+) of pretrain; rerun the same command to "
                       r"resume from step (\d+)\.", last)
  assert match, last
  step, total, resume = map(int, match.groups())
  assert total == STEPS and step == resume < STEPS and finished_steps(stopped)[-1] == step
  assert not [n for n in os.listdir(stopped) if n.endswith(".tmp") or n == ".lock"]
  rerun = subprocess.run(command(stopped), env=pretrain_env(), cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"resumed from step {step}" in rerun.stderr
  reference = subprocess.run(command(full), env=pretrain_env(), cwd=ROOT, capture_output=True, text=True,
                             timeout=600)
  assert reference.returncode == 0, reference.stderr[-3000:]
  for name in ("final.json",):
    with open(os.path.join(full, name)) as a, open(os.path.join(stopped, name)) as b:
      assert json.load(a) == json.load(b)
  assert metric_rows(full) == metric_rows(stopped)
