"""Helpers shared by the files in ``configs/``: argument parsing and the standard config sections."""

from __future__ import annotations

import importlib.util
import os
from typing import Sequence

import ml_collections
from ml_collections import config_dict


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses a config argument ``"relu,shots=5,classes=5-9"`` over ``defaults``.

  A bare key sets True; ``True``/``False`` (any case) are booleans; ``a-b`` is an inclusive integer
  range; other values are int/float/str.
  An unknown key is an error that lists the known ones.
  """
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"config argument {key!r} is unknown: use some of {sorted(defaults)}.")
    out[key] = _parse_value(value.strip()) if eq else True
  return ml_collections.ConfigDict(out)


def _parse_value(value: str):
  if value.lower() in ("true", "false"):
    return value.lower() == "true"
  if "-" in value[1:] and all(p.isdigit() for p in value.split("-")):
    lo, hi = map(int, value.split("-"))
    return tuple(range(lo, hi + 1))
  for cast in (int, float):
    try:
      return cast(value)
    except ValueError:
      pass
  return value


def data_config(name: str, *, image_size: int, classes=None, shots=None, augment: bool = False,
                heldout_fraction: float | None = None, **kw) -> ml_collections.ConfigDict:
  """The ``config.data`` section (fields documented in `lqf.data`).

  ``heldout_fraction`` is a float field even when None, so ``--config.data.heldout_fraction=0.2``
  works on the command line.
  """
  return ml_collections.ConfigDict(dict(
      name=name, image_size=image_size, classes=classes, shots=shots, shot_seed=0,
      heldout_fraction=config_dict.FieldReference(heldout_fraction, field_type=float),
      heldout_seed=0, augment=augment, data_dir=None, train_split="train", test_split="test", **kw))


def model_config(name: str, *, activation: str = "leaky_relu", negative_slope: float = 0.1,
                 width: int = 16, widths: Sequence[int] | None = None,
                 dtype: str = "float32") -> ml_collections.ConfigDict:
  """The ``config.model`` section (fields documented in `lqf.models.create_model`).

  ``widths`` is a tuple field even when None, so ``--config.model.widths='(4, 8, 64)'`` works.
  """
  widths = config_dict.FieldReference(None if widths is None else tuple(widths), field_type=tuple)
  return ml_collections.ConfigDict(dict(name=name, width=width, widths=widths, activation=activation,
                                        negative_slope=negative_slope, bn_momentum=0.9, dtype=dtype))


def training_config(config: ml_collections.ConfigDict, *, batch_size: int, lr: float,
                    weight_decay: float, warmup_steps: int, nesterov: bool = True) -> None:
  """Adds the optimisation and bookkeeping fields read by `lqf.train.train` to ``config``."""
  config.batch_size = batch_size
  config.eval_batch_size = batch_size
  config.optim = ml_collections.ConfigDict(dict(lr=lr, momentum=0.9, nesterov=nesterov,
                                                weight_decay=weight_decay, warmup_steps=warmup_steps))
  config.eval_every = 0  # once per epoch
  config.log_every = 50
  config.checkpoint_every = 500
  config.keep_checkpoints = 2
  config.distributed = False
  config.overwrite = False
  config.skip_nonfinite = False  # True: skip a batch whose loss/gradients are not finite instead of stopping


def load_sibling(this_file: str, name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """``get_config(arg)`` of ``configs/<name>.py`` next to ``this_file`` (a config embedding another)."""
  path = os.path.join(os.path.dirname(os.path.abspath(this_file)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
