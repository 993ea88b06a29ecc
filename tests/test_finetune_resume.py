"""Exact resume of fine-tuning: a fit interrupted after a checkpoint and rerun equals an uninterrupted one.

A fit checkpoint holds δ (or the fine-tuned parameters), the optimizer state (K-FAC inverses and the
quadratic step's momentum included) and the losses so far; the minibatch order is a pure function of the
seed (`lqf.fit.batch_order`), so the rerun skips the batches already seen. Measured: max |Δ| = 0.
"""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lqf import fit as fit_lib, linearize as lin_lib, train
from lqf.losses import one_hot_targets
from lqf.models import ResNet8
from lqf.runtime import checkpoint as ckpt_lib
from lqf.runtime import loop
from support import (ROOT, CrashAtCheckpoint, DiesAfter, kill_after_first_checkpoint, pretrain_env,
                     tiny_config)


def _problem():
  model = ResNet8(num_classes=3, width=4)
  x = jax.random.normal(jax.random.key(0), (24, 8, 8, 1))
  variables = model.init(jax.random.key(1), x)
  lin = lin_lib.linearize(model, variables, "^(stage3|head)/")
  return lin, variables, lin.features(variables, x), one_hot_targets(jnp.arange(24) % 3, 3, 15.0)


@pytest.mark.parametrize("options", [dict(batch_size=None, optimizer="quadratic"),
                                     dict(batch_size=10, optimizer="sgd", learning_rate=0.1)],
                         ids=["full_batch_quadratic", "minibatch_sgd"])
def test_interrupted_fit_resumes_to_the_same_delta(tmp_path, options):
  lin, variables, features, targets = _problem()
  fit_options = fit_lib.FitOptions(steps=9, weight_decay=1e-2, **options)
  ref, ref_hist = fit_lib.fit_linearized(lin, variables, features, targets, fit_options, seed=3)
  with pytest.raises(CrashAtCheckpoint):
    fit_lib.fit_linearized(lin, variables, features, targets, fit_options, seed=3,
                           run=functools.partial(loop.run, checkpoints=DiesAfter(str(tmp_path), at=4,
                                                                                  save_every=2)))
  checkpoints = ckpt_lib.RunCheckpoints(str(tmp_path), save_every=2)
  assert checkpoints.latest_step() == 4
  delta, hist = fit_lib.fit_linearized(lin, variables, features, targets, fit_options, seed=3,
                                       run=functools.partial(loop.run, checkpoints=checkpoints))
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(delta), strict=True):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(ref_hist["loss"], hist["loss"])
  assert checkpoints.latest_step() == 9  # the final state is kept


def test_batch_order_is_consecutive_permutations():
  order = np.concatenate([b for _, b in zip(range(5), fit_lib.batch_order(10, 4, seed=0))])
  assert sorted(order[:10]) == list(range(10)) and sorted(order[10:20]) == list(range(10))


def _finetune_command(source, workdir, steps):
  return [sys.executable, "-m", "experiments.finetune",
          "--config=configs/finetune_mnist.py:method=lqf_steps,shots=10,target=uci_digits",
          f"--config.pretrained.workdir={source}", "--config.data.image_size=8",
          f"--config.lqf.steps={steps}", "--config.checkpoint_every=20", f"--workdir={workdir}"]


@pytest.mark.slow
def test_lqf_finetuning_killed_with_sigkill_resumes_exactly(tmp_path):
  """`experiments/finetune.py` killed after a checkpoint, then rerun = an uninterrupted run."""
  source = str(tmp_path / "source")
  config = tiny_config(steps=4)
  config.data.classes = (0, 1, 2, 3, 4)
  train.train(config, source)
  steps = 120  # a checkpoint every 20: the kill lands after the first, 100 steps before the end
  full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
  start = lambda w: subprocess.Popen(_finetune_command(source, w, steps), env=pretrain_env(), cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  # One after the other: the victim and the rerun load the uninterrupted run's programs from the session's
  # compilation cache (tests/conftest.py) instead of compiling them again alongside it.
  uninterrupted = start(full)
  out, _ = uninterrupted.communicate(timeout=600)
  assert uninterrupted.returncode == 0, out[-3000:]
  at_kill = kill_after_first_checkpoint(start(killed), killed, steps)
  rerun = subprocess.run(_finetune_command(source, killed, steps), env=pretrain_env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert int(rerun.stderr.split("resumed from step ")[1].split()[0]) == at_kill[-1]
  results = []
  for workdir in (full, killed):
    with open(os.path.join(workdir, "result.json")) as f:
      results.append(json.load(f))
  assert results[0] == results[1]
  saved = [ocp.StandardCheckpointer().restore(os.path.join(w, "checkpoints", str(steps), "state"))
           for w in (full, killed)]  # δ, optimizer state and losses of the last step
  for a, b in zip(jax.tree.leaves(saved[0]), jax.tree.leaves(saved[1]), strict=True):
    np.testing.assert_array_equal(a, b)
