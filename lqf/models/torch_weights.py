"""Pretrained ResNet weights in torchvision's layout: import from ``.safetensors``/``.pth``, export.

torchvision's ``resnet18/34/50/101`` and timm's plain ``resnet18/34/50/101`` (its ``ResNet`` class
with the 7×7 stem and ``downsample = Sequential(conv1x1, bn)``) share one state-dict layout. The
Flax ResNets of `lqf.models.resnet` read and write it through a fixed name and layout map:

================================== ============================================ ====================
torchvision / timm                 Flax (``params``, or ``batch_stats``)        layout
================================== ============================================ ====================
``conv1.weight``                   ``stem/conv/kernel``                         OIHW → HWIO
``bn1.weight`` / ``bn1.bias``      ``stem/bn/scale`` / ``stem/bn/bias``
``bn1.running_mean`` / ``_var``    ``stem/bn/mean`` / ``stem/bn/var`` (stats)
``layer{S}.{B}.conv{K}.weight``    ``stage{S}/block{B+1}/conv{K}/kernel``       OIHW → HWIO
``layer{S}.{B}.bn{K}.*``           ``stage{S}/block{B+1}/bn{K}/*``
``layer{S}.{B}.downsample.0.*``    ``stage{S}/block{B+1}/shortcut_conv/kernel`` OIHW → HWIO
``layer{S}.{B}.downsample.1.*``    ``stage{S}/block{B+1}/shortcut_bn/*``
``fc.weight`` / ``fc.bias``        ``head/kernel`` / ``head/bias``              (out, in) → (in, out)
================================== ============================================ ====================

``num_batches_tracked`` is ignored. The map only renames and transposes, so
``state_dict_to_variables(variables_to_state_dict(v), model)`` returns ``v`` bit for bit.

The activation is not part of the weights: loading ReLU weights into a leaky-ReLU model
(``model.activation="leaky_relu"``) is the same call; what the swap does is in docs/weights.md, and
`lqf.models.recalibrate.recalibrate_batch_stats` refits the BatchNorm statistics afterwards.

``.safetensors`` files are read with ``safetensors.numpy`` (no torch needed); ``.pth``/``.pt``
files need torch (``pip install -e .[torch]``). Paths may be local or any ``etils.epath`` path.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from etils import epath
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from lqf.models.resnet import Bottleneck, ResNet

Variables = dict[str, Any]

TORCH_SUFFIXES = (".pth", ".pt")
# Flax leaf name -> torch tensor name suffix (BN scale and conv/dense kernels are torch's weight).
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
           "var": "running_var"}
_TORCH_LEAVES = tuple(dict.fromkeys(_LEAVES.values()))  # weight, bias, running_mean, running_var
_STEM_MODULES = {"conv": "conv1", "bn": "bn1"}
_BLOCK_MODULES = {"shortcut_conv": "downsample.0", "shortcut_bn": "downsample.1"}
_ARCHITECTURES = {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34",
                  ((3, 4, 6, 3), True): "resnet50", ((3, 4, 23, 3), True): "resnet101",
                  ((3, 8, 36, 3), True): "resnet152"}


def torch_name(path: tuple[str, ...]) -> str:
  """torchvision's tensor name for a Flax variable path, e.g. ``("stage4", "block1", "bn2", "var")``.

  Args:
    path: the variable's path in ``params`` or ``batch_stats`` (module names, then the leaf).

  Returns:
    The state-dict key, e.g. ``"layer4.0.bn2.running_var"``.
  """
  *modules, leaf = path
  if leaf in _LEAVES:
    if modules == ["head"]:
      return f"fc.{_LEAVES[leaf]}"
    if len(modules) == 2 and modules[0] == "stem" and modules[1] in _STEM_MODULES:
      return f"{_STEM_MODULES[modules[1]]}.{_LEAVES[leaf]}"
    if len(modules) == 3:
      stage, block, module = (re.fullmatch(p, m) for p, m in zip(
          (r"stage(\d+)", r"block(\d+)", r"(conv\d|bn\d|shortcut_conv|shortcut_bn)"), modules))
      if stage and block and module:
        return (f"layer{stage[1]}.{int(block[1]) - 1}.{_BLOCK_MODULES.get(module[1], module[1])}."
                f"{_LEAVES[leaf]}")
  raise ValueError(f"variable {'/'.join(path)} has no torchvision name: only the ResNets of "
                   "lqf.models.resnet map to torchvision's layout.")


def to_torch_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  """Flax layout -> torch: conv kernel HWIO -> OIHW, dense kernel (in, out) -> (out, in)."""
  if path[-1] == "kernel":
    return np.transpose(value, (3, 2, 0, 1) if value.ndim == 4 else (1, 0))
  return value


def to_flax_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  """torch layout -> Flax: conv weight OIHW -> HWIO, dense weight (out, in) -> (in, out)."""
  if path[-1] == "kernel":
    return np.transpose(value, (2, 3, 1, 0) if value.ndim == 4 else (1, 0))
  return value


def describe_state_dict(state_dict: Mapping[str, np.ndarray]) -> str:
  """What architecture a torchvision-layout state dict holds, e.g. ``"resnet50 (Bottleneck ...)"``."""
  blocks: dict[int, int] = {}
  for key in state_dict:
    if m := re.match(r"layer(\d+)\.(\d+)\.", key):
      blocks[int(m[1])] = max(blocks.get(int(m[1]), 0), int(m[2]) + 1)
  if "conv1.weight" not in state_dict or not blocks:
    return ("something other than a plain torchvision/timm ResNet (first tensors: "
            f"{sorted(state_dict)[:3]})")
  sizes = tuple(blocks[s] for s in sorted(blocks))
  bottleneck = "layer1.0.conv3.weight" in state_dict
  width, channels, k, _ = state_dict["conv1.weight"].shape
  classes = state_dict["fc.weight"].shape[0] if "fc.weight" in state_dict else "no"
  # Wide ResNets and ResNeXts share the names; their first 3x3 convolution is not 64 -> 64.
  plain = getattr(state_dict.get("layer1.0.conv2.weight"), "shape", ())[:2] == (64, 64)
  name = _ARCHITECTURES.get((sizes, bottleneck), "a ResNet") if plain else "a ResNet variant"
  return (f"{name} "
          f"({'Bottleneck' if bottleneck else 'BasicBlock'} blocks {sizes}, {k}x{k} stem of width "
          f"{width} on {channels} input channels, {classes} classes)")


def _describe_model(model: ResNet) -> str:
  return _ARCHITECTURES.get((tuple(model.stage_sizes), model.block is Bottleneck), "the model")


def _torch_order(name: str) -> list[tuple[int, ...]]:
  """Sort key for state-dict names in torchvision's order: conv1, bn1, layer1.0.conv1, ..., fc."""
  *modules, leaf = name.split(".")
  key = []
  for m in modules:
    if conv_bn := re.fullmatch(r"(conv|bn)(\d+)", m):
      key.append((1, int(conv_bn[2]), conv_bn[1] == "bn"))
    elif layer := re.fullmatch(r"layer(\d+)", m):
      key.append((2, int(layer[1])))
    else:  # a block or Sequential index, downsample, fc
      key.append((0, int(m)) if m.isdigit() else ({"downsample": 3, "fc": 4}.get(m, 5),))
  return key + [(_TORCH_LEAVES.index(leaf) if leaf in _TORCH_LEAVES else len(_TORCH_LEAVES),)]


def variables_to_state_dict(variables: Variables) -> dict[str, np.ndarray]:
  """Flax ``{'params', 'batch_stats'}`` -> torchvision state dict (numpy, torch layout, same dtype)."""
  state = {}
  for collection in ("params", "batch_stats"):
    for path, value in flax.traverse_util.flatten_dict(variables[collection]).items():
      state[torch_name(path)] = np.ascontiguousarray(to_torch_layout(path, np.asarray(value)))
  return dict(sorted(state.items(), key=lambda kv: _torch_order(kv[0])))


def state_dict_to_variables(state_dict: Mapping[str, np.ndarray], model: ResNet, *,
                            input_channels: int = 3, drop_head: bool = False,
                            source: str = "the state dict") -> Variables:
  """torchvision state dict -> Flax ``{'params': ..., 'batch_stats': ...}`` for ``model``.

  Every tensor the model needs must be present with the matching shape, and every tensor present
  must be used (``num_batches_tracked`` aside): the first failure raises a one-line `ValueError`
  naming the tensor, the expected shape and the architecture the file holds.

  Args:
    state_dict: name -> array in torch layout (`read_state_dict`).
    model: the Flax ResNet to load into (its activation is irrelevant to the weights).
    input_channels: channels of the images the model takes (3 for ImageNet).
    drop_head: leave out ``fc`` (and ``head`` from ``params``) so the fine-tuning code can put a
      fresh head for a different number of classes: ``{**init["params"], **loaded["params"]}``.
    source: how errors name the state dict (e.g. its path).

  Returns:
    Float32 ``params`` and ``batch_stats`` with the Flax model's paths and layouts.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 32, 32, input_channels), jnp.float32))
  expected = []
  for collection in ("params", "batch_stats"):
    for path, leaf in flax.traverse_util.flatten_dict(shapes[collection]).items():
      if not (drop_head and path[0] == "head"):
        expected.append((torch_name(path), collection, path, leaf.shape))
  expected.sort(key=lambda e: _torch_order(e[0]))
  arch = _describe_model(model)
  flat: dict[str, dict[tuple[str, ...], jax.Array]] = {"params": {}, "batch_stats": {}}
  for name, collection, path, shape in expected:
    torch_shape = to_torch_layout(path, np.broadcast_to(np.empty((), np.bool_), shape)).shape
    found = state_dict.get(name)
    if found is None or found.shape != torch_shape:
      problem = "lacks" if found is None else f"has shape {tuple(found.shape)} for"
      hint = ("; pass drop_head=True to start a fresh head for the new classes"
              if path[0] == "head" else "")
      raise ValueError(f"{source} {problem} {name} (expected {torch_shape} for {arch}'s "
                       f"{'/'.join(path)}); the file holds {describe_state_dict(state_dict)}{hint}.")
    flat[collection][path] = jnp.asarray(to_flax_layout(path, np.asarray(found, np.float32)))
  unused = sorted(set(state_dict) - {e[0] for e in expected}, key=_torch_order)
  unused = [n for n in unused
            if not n.endswith("num_batches_tracked") and not (drop_head and n.startswith("fc."))]
  if unused:
    raise ValueError(f"{source} has {len(unused)} tensors {arch} lacks (first: {unused[0]}); "
                     f"the file holds {describe_state_dict(state_dict)}.")
  return {c: flax.traverse_util.unflatten_dict(f) for c, f in flat.items()}


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a state dict from ``.safetensors`` (no torch needed) or ``.pth``/``.pt`` (needs torch).

  A ``.pth`` may hold the state dict itself or wrap it as ``{"state_dict": ...}`` or
  ``{"model": ...}`` (timm's and many training scripts' checkpoints); a ``module.`` prefix
  (``DistributedDataParallel``) is removed. bfloat16 tensors in a ``.pth`` are read as float32;
  ``safetensors.numpy`` cannot read bfloat16, so such a ``.safetensors`` file is refused.
  """
  path = epath.Path(path)
  if path.suffix == ".safetensors":
    try:
      return safetensors.numpy.load(path.read_bytes())
    except KeyError as e:  # a dtype numpy lacks: safetensors.numpy has no bfloat16
      raise ValueError(f"pretrained.path={str(path)!r} holds {e} tensors, which numpy cannot read: "
                       "save the checkpoint in float32 (or as .pth).") from e
  if path.suffix not in TORCH_SUFFIXES:
    raise ValueError(f"pretrained.path={str(path)!r} is neither .safetensors nor one of "
                     f"{TORCH_SUFFIXES}: convert the checkpoint to one of them.")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"pretrained.path={str(path)!r} is a torch pickle and torch is not installed: "
                      "pip install -e .[torch], or convert the file to .safetensors.") from e
  with path.open("rb") as f:
    obj = torch.load(f, map_location="cpu", weights_only=True)
  for key in ("state_dict", "model"):
    if isinstance(obj.get(key), dict):
      obj = obj[key]
  return {k.removeprefix("module."): (v.float() if v.dtype == torch.bfloat16 else v).numpy()
          for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_torchvision(path: str, model: ResNet, *, input_channels: int = 3,
                     drop_head: bool = False) -> Variables:
  """Reads a torchvision/timm ResNet checkpoint into Flax variables for ``model``.

  Args:
    path: ``.safetensors``, ``.pth`` or ``.pt`` file (``config.pretrained.path``).
    model: e.g. ``lqf.models.create_model(config.model, num_classes)``; any activation.
    input_channels: channels of the model's input images.
    drop_head: omit the classifier (see `state_dict_to_variables`).

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` (float32).
  """
  return state_dict_to_variables(read_state_dict(path), model, input_channels=input_channels,
                                 drop_head=drop_head, source=f"pretrained.path={str(path)!r}")


def save_torchvision(path: str, variables: Variables) -> None:
  """Writes ``variables`` as a ``.safetensors`` state dict in torchvision's layout and names.

  The file loads into a torchvision ResNet with ``model.load_state_dict(safetensors.torch.load_file
  (path))`` (the architecture and ``num_classes`` must match) and back here with `load_torchvision`.
  """
  path = epath.Path(path)
  if path.suffix != ".safetensors":
    raise ValueError(f"export path {str(path)!r} must end in .safetensors.")
  path.write_bytes(safetensors.numpy.save(variables_to_state_dict(variables),
                                          metadata={"format": "pt"}))
