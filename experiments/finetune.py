"""One fine-tuning run: a pretrained checkpoint, a target task with k shots, one method (LQF or a baseline).

  python -m experiments.finetune --config configs/finetune_mnist.py:method=lqf,shots=5 --workdir W

The training and test splits are held in memory or streamed (`lqf.runtime.memory.cache_plan`). The workdir is
claimed for the config (`lqf.runtime.checkpoint.claim_workdir`); with ``config.checkpoint_every`` > 0 the fit is
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
from absl import logging

from lqf import data as data_lib
from lqf import inference
from lqf import linearize as lin_lib
from lqf import methods
from lqf.models import create_model, recalibrate, torch_weights
from lqf.runtime import checkpoint as ckpt_lib
from lqf.runtime import cli, config_util
from lqf.runtime import memory
from lqf.runtime import task as task_lib
from lqf.runtime.metric_writer import MetricWriter


def settings(config: ml_collections.ConfigDict) -> tuple[methods.LQFSettings, methods.NonlinearSettings]:
  """The config's ``lqf`` and ``nonlinear`` sections as the library's settings (validated: one line
  naming ``config.lqf.<field>`` for a bad value)."""
  return (config_util.settings(methods.LQFSettings, config.lqf, "lqf"),
          config_util.settings(methods.NonlinearSettings, config.nonlinear, "nonlinear"))


def check_source(method: str, model_config: ml_collections.ConfigDict, lqf: methods.LQFSettings,
                 data: ml_collections.ConfigDict, source: str) -> None:
  """Fails unless ``method`` fits the source model: its activation (`lqf.methods.Method.activations`:
  lqf_relu linearizes a ReLU source, lqf / lqf_ce / lqf_no_kfac a leaky-ReLU or GELU one) and its trainable
  regex (matched against the model's parameter paths, traced with `jax.eval_shape`: nothing is computed)."""
  activation = model_config.get("activation")
  wanted = methods.get(method).activations
  if wanted and activation not in wanted:
    other = next((m for m in methods.names() if activation in (methods.get(m).activations or ())), "nonlinear")
    raise ValueError(f"config.method={method!r} linearizes a {' or '.join(wanted)} network, but {source} holds "
                     f"a {activation} model: use method={other!r}, or a {wanted[0]} checkpoint.")
  model = create_model(model_config, data_lib.num_classes(data))
  shape = (1, *data_lib.image_shape(data))
  abstract = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))
  try:
    lin_lib.linearize(model, abstract, methods.get(method).trainable(lqf))
  except ValueError as e:
    raise ValueError(f"config.lqf.{e}") from None


def source_field(method: str) -> str:
  """The ``config.pretrained`` field of the source ``method`` fine-tunes: the ReLU network for a method
  that needs one (`lqf.methods.Method.relu_source`), else the main one."""
  return "relu_workdir" if methods.get(method).relu_source else "workdir"


def check(config: ml_collections.ConfigDict, workdir: str) -> tuple[methods.LQFSettings,
                                                                    methods.NonlinearSettings]:
  """Every value `run` reads, before any data is read or any model built: the method, the settings,
  the data section, the source checkpoint (its metadata: activation, trainable regex) and the workdir."""
  methods.get(config.method, "config.method")
  lqf, nonlinear = settings(config)
  data_lib.check(config.data)
  if config.pretrained.get("format", "orbax") == "torchvision":
    if not config.pretrained.get("path"):
      raise ValueError("config.pretrained.path is not set: pass "
                       "--config.pretrained.path=/path/resnet50.safetensors")
    if not os.path.exists(config.pretrained.path):
      raise ValueError(f"config.pretrained.path={config.pretrained.path!r} does not exist: give the "
                       ".safetensors or .pth file of the torchvision/timm weights.")
  else:
    field = source_field(config.method)
    source = config.pretrained[field]
    try:
      meta = ckpt_lib.pretrained_meta(source)
    except FileNotFoundError:
      raise FileNotFoundError(
          f"config.pretrained.{field}={source!r} holds no pretrained checkpoint: run "
          f"`{config.pretrained.command} --workdir {source}` first.") from None
    check_source(config.method, ml_collections.ConfigDict(meta["config"]["model"]), lqf, config.data,
                 f"config.pretrained.{field}={source!r}")
  ckpt_lib.check_workdir(workdir, config)
  return lqf, nonlinear


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
  lqf, nonlinear = check(config, workdir)
  data = config.data
  torchvision = config.pretrained.get("format", "orbax") == "torchvision"
  if not torchvision:
    source = config.pretrained[source_field(config.method)]
    model_config, variables = task_lib.load_source(source, config.pretrained.command)
    ckpt_lib.check_compatible(variables, create_model(model_config, 1), data_lib.image_shape(data),
                              source=f"config.pretrained.workdir={source!r}", skip="^params/head/")
  train_source = data_lib.get_source(data, data.train_split)
  if torchvision:
    first = data_lib.eval_batches(train_source, data, batch_size=64)
    model_config, variables = load_torchvision_source(
        config, (np.asarray(b["image"])[np.asarray(b["mask"]) > 0] for b in first))
  test_source = data_lib.get_source(data, data.test_split)
  model = create_model(model_config, data_lib.num_classes(data))
  cache_train, cache_test = memory.cache_plan(config.method, lqf, data, model, len(train_source),
                                              len(test_source))
  logging.info("%s on %s: %d training images (%s), %d test images (%s); setting the %s head",
               config.method, data.name, len(train_source), "in memory" if cache_train else "streamed",
               len(test_source), "in memory" if cache_test else "streamed", lqf.head_init)
  if cache_train:
    train = data_lib.source_arrays(train_source, data)
    emb, labels = task_lib.embed(model, variables, train[0]), train[1]
  else:
    train = train_source
    emb, labels = task_lib.embed_stream(model, variables, data_lib.eval_batches(
        train_source, data, batch_size=inference.EVAL_BATCH_SIZE))
  model, variables = task_lib.with_new_head(
      model_config, variables, emb, labels, model.num_classes, head_init=lqf.head_init,
      target_scale=lqf.target_scale, head_ridge=lqf.head_ridge, seed=config.seed)
  test = data_lib.source_arrays(test_source, data) if cache_test else test_source
  ckpt_lib.claim_workdir(workdir, config)
  every = config.get("checkpoint_every", 0)
  checkpoints = ckpt_lib.RunCheckpoints(workdir, save_every=every) if every > 0 else None
  first = 0 if checkpoints is None else checkpoints.latest_step() or 0
  writer = MetricWriter(workdir, resume_step=first)
  try:
    metrics = task_lib.run_method(config.method, task_lib.Task(model, variables, train, test, data=data),
                                  lqf, nonlinear, config.seed, checkpoints,
                                  log_every=config.get("log_every", 10), writer=writer)
  finally:
    writer.close()
    if checkpoints is not None:
      checkpoints.close()
  result = os.path.join(workdir, "result.json")
  if jax.process_index() == 0:
    tmp = f"{result}.tmp"
    with open(tmp, "w") as f:
      json.dump({"method": config.method, "shots": data.shots, **metrics}, f, indent=2)
    os.replace(tmp, result)
  logging.info("%s, %s shots per class: test accuracy %.4f%s; wrote %s and %s", config.method,
               data.shots or "all", metrics["accuracy"],
               f", final training objective {metrics['train_loss']:.4g}" if "train_loss" in metrics else "",
               result, os.path.join(workdir, "metrics.jsonl"))
  return metrics


if __name__ == "__main__":
  cli.launch(run)
