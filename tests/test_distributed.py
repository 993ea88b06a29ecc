"""Many devices, many hosts: the same pretraining on 1 device, 8 fake CPU devices and 2 processes.

All runs are the real entry point (``python -m experiments.pretrain``) with the same global batch of 16;
the 2-process run is the README's pod recipe on 127.0.0.1 (``LQF_DISTRIBUTED=1`` and
``JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID``, gloo collectives), each process reading
its own half of every batch and the whole test set. Measured max |Δparam| after 20 steps: 2.6e-6 for
8 devices, 1.5e-6 for 2 processes (float32 reductions in another order); test loss within 1e-6.
"""

import json
import socket
import subprocess

import jax
import numpy as np
import pytest

from lqf.runtime import checkpoint as ckpt_lib
from lqf.runtime.metric_writer import read_metrics
from support import ROOT, pretrain_command, pretrain_env


STEPS = 20
PRETRAIN = pretrain_command(STEPS, 10)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Workdirs of the three runs (started together): {'1 device', '8 devices', '2 processes'}."""
  root = tmp_path_factory.mktemp("distributed")
  port = _free_port()
  commands = {
      "1 device": [(PRETRAIN, pretrain_env(1))],
      "8 devices": [(PRETRAIN, pretrain_env(8))],
      "2 processes": [(PRETRAIN, pretrain_env(
          1, LQF_DISTRIBUTED="1", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
          JAX_PROCESS_ID=str(p))) for p in range(2)],
  }
  procs = [(name, subprocess.Popen(cmd + [f"--workdir={root / name.replace(' ', '_')}"], env=env,
                                   cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
           for name, parts in commands.items() for cmd, env in parts]
  for name, proc in procs:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{name}:\n{out[-3000:]}"
  return {name: root / name.replace(" ", "_") for name in commands}


def _max_abs_diff(a, b) -> float:
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 0
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(leaves_a, leaves_b))


def _losses(workdir) -> list[float]:
  return [r["train_loss"] for r in read_metrics(str(workdir / "metrics.jsonl")) if "train_loss" in r]


def _final(workdir) -> dict:
  with open(workdir / "final.json") as f:
    return json.load(f)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["8 devices", "2 processes"])
def test_same_parameters_and_metrics_as_one_device(runs, name):
  reference, _ = ckpt_lib.load_pretrained(str(runs["1 device"]))
  variables, _ = ckpt_lib.load_pretrained(str(runs[name]))
  assert _max_abs_diff(variables, reference) <= 1e-5
  assert len(_losses(runs[name])) == STEPS
  np.testing.assert_allclose(_losses(runs[name]), _losses(runs["1 device"]), rtol=0, atol=1e-5)
  # Evaluation over the whole test set: the same predictions (a reordering would break accuracy).
  final, ref = _final(runs[name]), _final(runs["1 device"])
  assert ref["accuracy"] > 0.9
  assert final["accuracy"] == ref["accuracy"]
  assert abs(final["loss"] - ref["loss"]) <= 1e-5


@pytest.mark.slow
def test_every_process_checkpoints_its_data_position(runs):
  """Both processes wrote their iterator's position: 8 of the 16 records of every step each."""
  def position(workdir, name):
    data = workdir / "checkpoints" / str(STEPS) / "data" / name
    return json.loads(data.read_text())["next_index"]
  assert [position(runs["2 processes"], f"process_{p}-of-2.json") for p in range(2)] == [STEPS * 8] * 2
  assert position(runs["1 device"], "process_0-of-1.json") == STEPS * 16
