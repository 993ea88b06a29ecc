"""Flax models with named split points: leaky-ReLU ResNets (`lqf.models.resnet`) and a small Vision
Transformer (`lqf.models.vit`); the protocol they implement is `lqf.network`'s."""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING

import jax.numpy as jnp

if TYPE_CHECKING:  # the config type only: importing the models loads no config library
  import ml_collections

from lqf.models.resnet import (ACTIVATIONS, BasicBlock, Bottleneck, ResNet, ResNet8, ResNet18,
                               ResNet20, ResNet34, ResNet50, ResNet101, SmallResNet, make_activation)
from lqf.models import vit
from lqf.models.vit import ViT

IMAGENET_MODELS = {"resnet18": ResNet18, "resnet34": ResNet34, "resnet50": ResNet50,
                   "resnet101": ResNet101}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def known_models() -> list[str]:
  return [*IMAGENET_MODELS, "resnet<6n+2> (small-image: resnet8, resnet14, resnet20, ...)", "vit"]


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> ResNet | ViT:
  """Builds the model named by ``config`` (the ``model`` section of an experiment config).

  Fields: ``name`` (``resnet8``/``resnet20``/any ``resnet<6n+2>`` small-image net, or
  ``resnet18/34/50/101``, or ``vit``), ``width`` (small nets; a ViT's token dimension), ``widths`` (optional: one base width per stage,
  e.g. ``(4, 8, 64)`` for a small net; None keeps the architecture's, ``(width, 2·width, 4·width)``
  for small nets and ``(64, 128, 256, 512)`` for the ImageNet ones; a bottleneck stage outputs 4×
  its width), ``activation``, ``negative_slope``, ``bn_momentum``, ``dtype`` (computation dtype:
  ``float32`` or ``bfloat16``); a ViT's ``patch_size``, ``depth``, ``num_heads``, ``mlp_dim``
  (`lqf.models.vit.ViT`; its activation may also be ``gelu``).
  """
  name = config.name.lower()
  activations = vit.ACTIVATIONS if name == "vit" else ACTIVATIONS
  if config.activation not in activations:
    raise ValueError(f"model.activation={config.activation!r} is unknown: use one of {activations}.")
  dtype_name = config.get("dtype", "float32")
  if dtype_name not in DTYPES:
    raise ValueError(f"model.dtype={dtype_name!r} is unknown: use one of {list(DTYPES)}.")
  if name == "vit":
    sizes = {f: config[f] for f in ("patch_size", "width", "depth", "num_heads", "mlp_dim") if f in config}
    return ViT(num_classes, activation=config.activation, negative_slope=config.negative_slope,
               dtype=DTYPES[dtype_name], **sizes)
  kw = dict(num_classes=num_classes, activation=config.activation,
            negative_slope=config.negative_slope, bn_momentum=config.get("bn_momentum", 0.9),
            dtype=DTYPES[dtype_name])
  if name in IMAGENET_MODELS:
    model = IMAGENET_MODELS[name](**kw)
  elif name.startswith("resnet") and name[6:].isdigit() and _is_small_depth(int(name[6:])):
    model = SmallResNet(int(name[6:]), width=config.get("width", 16), **kw)
  else:
    raise ValueError(f"model.name={config.name!r} is unknown: use one of {known_models()}.")
  widths = config.get("widths")
  if widths is None:
    return model
  num_stages = len(model.stage_sizes)
  if (not isinstance(widths, (tuple, list)) or len(widths) != num_stages
      or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= 1
                 for w in widths)):
    raise ValueError(f"model.widths={widths!r} is not {num_stages} positive integers: give one width "
                     f"per stage of {config.name}, or None for {tuple(model.widths)}.")
  return model.clone(widths=tuple(int(w) for w in widths))


def _is_small_depth(depth: int) -> bool:
  """Depth 6n+2, n ≥ 1: a `SmallResNet`."""
  return depth >= 8 and (depth - 2) % 6 == 0


__all__ = ["ACTIVATIONS", "BasicBlock", "Bottleneck", "ResNet", "ResNet8", "ResNet18", "ResNet20",
           "ResNet34", "ResNet50", "ResNet101", "SmallResNet", "ViT", "create_model", "known_models",
           "make_activation"]
