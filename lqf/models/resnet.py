"""ResNets (v1.5) in Flax with a configurable activation and readable parameter paths.

Two families share one implementation:

* ImageNet ResNets (`ResNet18/34/50/101`): 7×7/2 stem, 3×3/2 max-pool, four stages, stride on the
  3×3 convolution of a bottleneck (v1.5). With ``num_classes=1000`` the parameter counts equal
  torchvision's (ResNet-18: 11,689,512; ResNet-50: 25,557,032).
* Small-image ResNets for 28–32 px inputs (`ResNet8`, `ResNet20`, `SmallResNet`): 3×3/1 stem, no
  max-pool, three stages of widths ``w, 2w, 4w`` (He et al. 2016, §4.2).

Parameter paths are stable and readable, e.g. ``stem/conv/kernel``, ``stage4/block1/conv2/kernel``,
``stage4/block1/shortcut_bn/scale``, ``head/kernel`` — so a regex such as ``^(stage4|head)/`` selects
"the last stage and the head".

The forward pass is a sequence of *split points* (``model.split_points()``):
``["stem", "stage1/block1", ..., "stageK/blockM", "head"]`` where ``"head"`` is global average
pooling followed by the classifier. ``model.apply(v, x, stop=p)`` returns the input of point ``p``
and ``model.apply(v, h, start=p)`` continues from it, so a frozen trunk can be computed once and
cached (see `lqf.linearize`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from lqf import network

ACTIVATIONS = ("relu", "leaky_relu")
STEMS = ("imagenet", "small")


def make_activation(name: str, negative_slope: float) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """Returns ``relu`` or ``leaky_relu`` with the given slope (σ(x) = max(x, slope·x))."""
  if name == "relu":
    return nn.relu
  if name == "leaky_relu":
    return functools.partial(nn.leaky_relu, negative_slope=negative_slope)
  raise ValueError(f"model.activation={name!r} is unknown: use one of {ACTIVATIONS}.")


def _conv(features: int, kernel: int, stride: int, name: str, dtype: Any) -> nn.Conv:
  """Bias-free convolution with torch-style symmetric padding k//2 (so weights port exactly)."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
                 use_bias=False, dtype=dtype, name=name)


class BasicBlock(nn.Module):
  """Two 3×3 convolutions with a residual connection (ResNet-18/34 and the small ResNets)."""
  features: int
  stride: int
  act: Callable[[jnp.ndarray], jnp.ndarray]
  norm: Callable[..., nn.Module]
  dtype: Any = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    y = _conv(self.features, 3, self.stride, "conv1", self.dtype)(x)
    y = self.act(self.norm(name="bn1")(y))
    y = _conv(self.features, 3, 1, "conv2", self.dtype)(y)
    y = self.norm(name="bn2")(y)
    return self.act(y + _shortcut(self, x, self.features))


class Bottleneck(nn.Module):
  """1×1 → 3×3 (strided, v1.5) → 1×1 ×4 bottleneck with a residual connection (ResNet-50/101)."""
  features: int
  stride: int
  act: Callable[[jnp.ndarray], jnp.ndarray]
  norm: Callable[..., nn.Module]
  dtype: Any = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    y = self.act(self.norm(name="bn1")(_conv(self.features, 1, 1, "conv1", self.dtype)(x)))
    y = self.act(self.norm(name="bn2")(_conv(self.features, 3, self.stride, "conv2", self.dtype)(y)))
    y = self.norm(name="bn3")(_conv(self.features * 4, 1, 1, "conv3", self.dtype)(y))
    return self.act(y + _shortcut(self, x, self.features * 4))


def _shortcut(block: nn.Module, x: jnp.ndarray, out_features: int) -> jnp.ndarray:
  """Identity, or a 1×1 strided projection + BN when the shape changes (torchvision's downsample)."""
  if block.stride == 1 and x.shape[-1] == out_features:
    return x
  y = nn.Conv(out_features, (1, 1), (block.stride, block.stride), use_bias=False, dtype=block.dtype,
              name="shortcut_conv")(x)
  return block.norm(name="shortcut_bn")(y)


class Stem(nn.Module):
  """``"imagenet"``: 7×7/2 conv, BN, act, 3×3/2 max-pool; ``"small"``: 3×3/1 conv, BN, act."""
  features: int
  kind: str
  act: Callable[[jnp.ndarray], jnp.ndarray]
  norm: Callable[..., nn.Module]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    if self.kind not in STEMS:
      raise ValueError(f"model.stem={self.kind!r} is unknown: use one of {STEMS}.")
    kernel, stride = (7, 2) if self.kind == "imagenet" else (3, 1)
    x = self.act(self.norm(name="bn")(_conv(self.features, kernel, stride, "conv", self.dtype)(x)))
    if self.kind == "imagenet":
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    return x


class Stage(nn.Module):
  """Blocks ``block1..blockN`` of one stage; runs the (0-based) ``blocks`` given, in order."""
  features: int
  block: type[nn.Module]
  blocks: tuple[int, ...]
  first_stride: int
  act: Callable[[jnp.ndarray], jnp.ndarray]
  norm: Callable[..., nn.Module]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    for b in self.blocks:
      stride = self.first_stride if b == 0 else 1
      x = self.block(self.features, stride, self.act, self.norm, dtype=self.dtype,
                     name=f"block{b + 1}")(x)
    return x


class ResNet(nn.Module):
  """A ResNet whose forward pass can start and stop at named split points.

  Attributes:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    block: `BasicBlock` or `Bottleneck`.
    num_classes: width of the classifier ``head``.
    widths: base width of each stage (a bottleneck stage outputs 4× its width).
    stem: ``"imagenet"`` (7×7/2 conv + 3×3/2 max-pool) or ``"small"`` (3×3/1 conv).
    activation: ``"relu"`` or ``"leaky_relu"``.
    negative_slope: the leaky-ReLU slope.
    bn_momentum: running-statistics momentum (Flax convention: new = m·old + (1−m)·batch).
    dtype: computation dtype (parameters stay float32).
  """
  stage_sizes: Sequence[int]
  block: type[nn.Module]
  num_classes: int
  widths: Sequence[int] = (64, 128, 256, 512)
  stem: str = "imagenet"
  activation: str = "leaky_relu"
  negative_slope: float = 0.1
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32

  def split_points(self) -> list[str]:
    """Names of the points the forward pass can start or stop at, in order."""
    blocks = [f"stage{s + 1}/block{b + 1}" for s, n in enumerate(self.stage_sizes) for b in range(n)]
    return ["stem", *blocks, "head"]

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False, *, start: str | None = None,
               stop: str | None = None, return_embedding: bool = False):
    """Runs the points from ``start`` (default: the input) up to, excluding, ``stop``.

    Args:
      x: images (B, H, W, C), or the input of point ``start``.
      train: BatchNorm uses batch statistics and updates ``batch_stats`` when True.
      start: split point to start from (``x`` is then that point's input).
      stop: split point to stop before; its input is returned.
      return_embedding: also return the pooled penultimate embedding (B, D).

    Returns:
      logits (B, num_classes), or ``(logits, embedding)``, or the input of ``stop``.
    """
    act = make_activation(self.activation, self.negative_slope)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=self.bn_momentum,
                             epsilon=1e-5, dtype=self.dtype)
    x = x.astype(self.dtype)
    run = network.points_between(self.split_points(), start, stop)
    if "stem" in run:
      x = Stem(self.widths[0], self.stem, act, norm, self.dtype, name="stem")(x)
    for s, n in enumerate(self.stage_sizes):
      blocks = [b for b in range(n) if f"stage{s + 1}/block{b + 1}" in run]
      if blocks:
        x = Stage(self.widths[s], self.block, tuple(blocks), first_stride=1 if s == 0 else 2,
                  act=act, norm=norm, dtype=self.dtype, name=f"stage{s + 1}")(x)
    if "head" not in run:
      return x
    emb = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(emb).astype(jnp.float32)
    return (logits, emb.astype(jnp.float32)) if return_embedding else logits


def _imagenet(stage_sizes: Sequence[int], block: type[nn.Module]):
  def make(num_classes: int = 1000, **kw) -> ResNet:
    return ResNet(stage_sizes=tuple(stage_sizes), block=block, num_classes=num_classes, **kw)
  return make


ResNet18 = _imagenet((2, 2, 2, 2), BasicBlock)
ResNet34 = _imagenet((3, 4, 6, 3), BasicBlock)
ResNet50 = _imagenet((3, 4, 6, 3), Bottleneck)
ResNet101 = _imagenet((3, 4, 23, 3), Bottleneck)


def SmallResNet(depth: int, num_classes: int, width: int = 16, **kw) -> ResNet:  # pylint: disable=invalid-name
  """A small-image ResNet of depth 6n+2: 3×3 stem, 3 stages of n basic blocks, widths w, 2w, 4w."""
  if depth < 8 or (depth - 2) % 6:
    raise ValueError(f"model.depth={depth} is invalid for a small ResNet: use 6n+2 (8, 14, 20, 32, …).")
  n = (depth - 2) // 6
  return ResNet(stage_sizes=(n, n, n), block=BasicBlock, num_classes=num_classes,
                widths=(width, 2 * width, 4 * width), stem="small", **kw)


def ResNet8(num_classes: int = 10, width: int = 16, **kw) -> ResNet:  # pylint: disable=invalid-name
  return SmallResNet(8, num_classes, width, **kw)


def ResNet20(num_classes: int = 10, width: int = 16, **kw) -> ResNet:  # pylint: disable=invalid-name
  return SmallResNet(20, num_classes, width, **kw)
