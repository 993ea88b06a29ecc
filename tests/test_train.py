"""Pretraining loop: sharded = unsharded, checkpoint round trip, exact resume, one-line errors."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lqf import checkpoint as ckpt_lib
from lqf import config_util, train
from lqf.metric_writer import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(steps=6, batch_size=16):
  config = config_util.load_sibling(os.path.join(ROOT, "configs", "x.py"), "pretrain_mnist",
                                    f"classes=0-1,steps={steps}")
  config.model.width = 4
  config.batch_size = config.eval_batch_size = batch_size
  config.log_every = 1
  config.checkpoint_every = 3
  config.eval_every = 1000
  return config


def _params(workdir):
  variables, _ = ckpt_lib.load_pretrained(workdir)
  return variables


def test_resume_after_interruption_is_exact(tmp_path):
  full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
  train.train(tiny_config(), full)
  shutil.copytree(full, cut)
  # Simulate a kill after the step-3 checkpoint: drop the final checkpoint and the later metric rows.
  shutil.rmtree(os.path.join(cut, "checkpoints", "6"))
  rows = [r for r in read_metrics(os.path.join(cut, "metrics.jsonl")) if r["step"] <= 3]
  with open(os.path.join(cut, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  _, metrics = train.train(tiny_config(), cut)
  a, b = _params(full), _params(cut)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)  # same data order after resume (grain state restored)
  losses = lambda w: [r["train_loss"] for r in read_metrics(os.path.join(w, "metrics.jsonl"))
                      if "train_loss" in r]
  assert losses(full) == losses(cut)


def test_checkpoint_round_trip(tmp_path):
  tree = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "step": jnp.array(7)}
  ckpts = ckpt_lib.RunCheckpoints(str(tmp_path), save_every=1)
  ckpts.save(7, tree, meta={"config": {"model": {"name": "x"}}}, force=True)
  ckpts.wait()
  template = jax.tree.map(jnp.zeros_like, tree)
  restored = ckpts.restore(template)
  ckpts.close()
  np.testing.assert_array_equal(restored["params"]["w"], tree["params"]["w"])
  assert int(restored["step"]) == 7


def test_workdir_with_another_config_is_refused(tmp_path):
  workdir = str(tmp_path)
  ckpt_lib.claim_workdir(workdir, tiny_config(steps=1))
  os.makedirs(os.path.join(workdir, "checkpoints", "1"))
  ckpt_lib.claim_workdir(workdir, tiny_config(steps=1))  # the same config: accepted
  with pytest.raises(ValueError, match=r"holds a run of a different config \(fields \['num_steps'\]"):
    ckpt_lib.claim_workdir(workdir, tiny_config(steps=2))
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "1"))  # nothing lost
  other = tiny_config(steps=2)
  other.overwrite = True
  ckpt_lib.claim_workdir(workdir, other)
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))


@pytest.mark.parametrize("field,value,message", [
    ("batch_size", 0, "config.batch_size=0 must be positive"),
    ("num_steps", -1, "config.num_steps gives -1 training steps"),
])
def test_bad_config_values(tmp_path, field, value, message):
  config = tiny_config()
  config[field] = value
  with pytest.raises(ValueError, match=message):
    train.train(config, str(tmp_path))


_DEVICES_SCRIPT = """
import json, os, sys
sys.path.insert(0, {root!r})
import jax
jax.config.update("jax_default_matmul_precision", "highest")
from tests.test_train import tiny_config
from lqf import train
config = tiny_config(steps=5, batch_size=16)
train.train(config, sys.argv[1])
print(json.dumps(jax.device_count()))
"""


@pytest.mark.slow
def test_four_fake_devices_match_one_device(tmp_path):
  losses = {}
  for n in (1, 4):
    workdir = str(tmp_path / f"d{n}")
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _DEVICES_SCRIPT.format(root=ROOT), workdir], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str(n)
    losses[n] = [r["train_loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
                 if "train_loss" in r]
  assert len(losses[1]) == 5
  np.testing.assert_allclose(losses[4], losses[1], rtol=0, atol=1e-5)
