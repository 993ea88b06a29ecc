"""One fine-tuning run: a pretrained checkpoint, a target task with k shots, one method (LQF or a baseline).

  python -m experiments.finetune --config configs/finetune_mnist.py:method=lqf,shots=5 --workdir W

The training and test splits are held in memory or streamed (`lqf.finetune.cache_plan`). The workdir is
claimed for the config (`lqf.checkpoint.claim_workdir`); with ``config.checkpoint_every`` > 0 the fit is
checkpointed there every that many steps and after the last (δ or the fine-tuned parameters, optimizer
state, losses, a stream's position): a rerun resumes from the latest checkpoint and ends with the same
numbers as an uninterrupted run. Writes ``result.json``.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lqf import checkpoint as ckpt_lib
from lqf import cli
from lqf import data as data_lib
from lqf import finetune, inference
from lqf.models import create_model, recalibrate, torch_weights


def settings(config: ml_collections.ConfigDict) -> tuple[finetune.LQFSettings, finetune.NonlinearSettings]:
  """The config's ``lqf`` and ``nonlinear`` sections as the library's settings."""
  return (finetune.LQFSettings(**config.lqf.to_dict()),
          finetune.NonlinearSettings(**config.nonlinear.to_dict()))


def load_torchvision_source(config: ml_collections.ConfigDict, images: Iterable[np.ndarray]
                            ) -> tuple[ml_collections.ConfigDict, dict]:
  """``config.model``'s architecture with torchvision/timm weights (head dropped), BN recalibrated.

  The file's ReLU weights go into ``config.model.activation`` (e.g. leaky ReLU); with
  ``pretrained.recalibrate_bn`` the BatchNorm statistics are recomputed on the first
  ``pretrained.recalibrate_batches`` batches of ``images`` (training images (B, H, W, C) in batches,
  `lqf.models.recalibrate`).
  """
  p = config.pretrained
  if not p.get("path"):
    raise ValueError("config.pretrained.path is not set: pass --config.pretrained.path=/path/resnet50.safetensors")
  model = create_model(config.model, 1)
  variables = torch_weights.load_torchvision(p.path, model, drop_head=True)
  if p.get("recalibrate_bn", False):
    batches = [jnp.asarray(x) for x in itertools.islice(images, p.recalibrate_batches)]
    variables = recalibrate.recalibrate_batch_stats(model, variables, batches)
  return config.model, variables


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """One method, one shot count, one seed; writes ``result.json`` and returns the test metrics."""
  finetune.check_method(config.method)
  lqf, nonlinear = settings(config)
  data = config.data
  torchvision = config.pretrained.get("format", "orbax") == "torchvision"
  if not torchvision:
    source = config.pretrained.relu_workdir if config.method == "lqf_relu" else config.pretrained.workdir
    model_config, variables = finetune.load_source(source, config.pretrained.command)
    ckpt_lib.check_compatible(variables, create_model(model_config, 1), data_lib.image_shape(data),
                              source=f"config.pretrained.workdir={source!r}", skip="^params/head/")
  train_source = data_lib.get_source(data, data.train_split)
  if torchvision:
    first = data_lib.eval_batches(train_source, data, batch_size=64)
    model_config, variables = load_torchvision_source(
        config, (np.asarray(b["image"])[np.asarray(b["mask"]) > 0] for b in first))
  test_source = data_lib.get_source(data, data.test_split)
  model = create_model(model_config, data_lib.num_classes(data))
  cache_train, cache_test = finetune.cache_plan(config.method, lqf, data, model, len(train_source),
                                                len(test_source))
  if cache_train:
    train = data_lib.source_arrays(train_source, data)
    emb, labels = finetune.embed(model, variables, train[0]), train[1]
  else:
    train = train_source
    emb, labels = finetune.embed_stream(model, variables, data_lib.eval_batches(
        train_source, data, batch_size=inference.EVAL_BATCH_SIZE))
  model, variables = finetune.with_new_head(
      model_config, variables, emb, labels, model.num_classes, head_init=lqf.head_init,
      target_scale=lqf.target_scale, head_ridge=lqf.head_ridge, seed=config.seed)
  test = data_lib.source_arrays(test_source, data) if cache_test else test_source
  ckpt_lib.claim_workdir(workdir, config)
  every = config.get("checkpoint_every", 0)
  checkpoints = ckpt_lib.RunCheckpoints(workdir, save_every=every) if every > 0 else None
  try:
    metrics = finetune.run_method(config.method, finetune.Task(model, variables, train, test, data=data),
                                  lqf, nonlinear, config.seed, checkpoints)
  finally:
    if checkpoints is not None:
      checkpoints.close()
  if jax.process_index() == 0:
    tmp = os.path.join(workdir, "result.json.tmp")
    with open(tmp, "w") as f:
      json.dump({"method": config.method, "shots": data.shots, **metrics}, f, indent=2)
    os.replace(tmp, os.path.join(workdir, "result.json"))
  return metrics


if __name__ == "__main__":
  cli.launch(run)
