"""A small Vision Transformer with named split points, for LQF on a transformer.

  patches (a p×p-strided convolution) + position embedding -> depth pre-LN blocks -> LayerNorm -> mean
  over the tokens -> Dense head,

each block x + MHSA(LN(x)), then x + MLP(LN(x)) with MLP = Dense(mlp_dim) -> σ -> Dense(width); σ is GELU,
or (piecewise linear, as LQF's ResNets are) leaky ReLU or ReLU. No dropout, no BatchNorm: the network is the
same function in training and at test time.

Split points (the protocol of `lqf.network`): ``embed``, ``block1`` … ``block<depth>``, ``norm`` (the final
LayerNorm), ``head`` (the mean over tokens and the classifier). ``model.apply(v, x, stop=p)`` returns the
input of point p, ``model.apply(v, h, start=p)`` continues from it, so the frozen trunk before a trainable
block runs once per image. Every parameter lives under its point's module (``embed/pos_embedding``,
``block3/attention/query/kernel``, ``head/kernel``, …). This is how to give your own model split points.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lqf import network
from lqf.models.resnet import make_activation
from lqf.models.transformer import EncoderBlock

ACTIVATIONS = ("gelu", "leaky_relu", "relu")


class PatchEmbedding(nn.Module):
  """Non-overlapping p×p patches -> tokens (B, T, width), plus a learned position embedding."""
  patch_size: int
  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), (p, p), padding="VALID", dtype=self.dtype, name="patches")(x)
    x = x.reshape(x.shape[0], -1, self.width)
    position = self.param("pos_embedding", nn.initializers.normal(0.02), x.shape[1:])
    return x + position.astype(self.dtype)


class ViT(nn.Module):
  """A Vision Transformer whose forward pass can start and stop at named split points (module docstring).

  Attributes:
    num_classes: width of the classifier ``head``.
    patch_size: p (the image side must be a multiple).
    width: the token dimension D.
    depth: the number of blocks.
    num_heads: attention heads (must divide ``width``).
    mlp_dim: hidden width of each block's MLP.
    activation: the MLP's σ, one of `ACTIVATIONS`.
    negative_slope: the leaky-ReLU slope.
    dtype: computation dtype (parameters stay float32).
  """
  num_classes: int
  patch_size: int = 4
  width: int = 64
  depth: int = 4
  num_heads: int = 4
  mlp_dim: int = 128
  activation: str = "gelu"
  negative_slope: float = 0.1
  dtype: Any = jnp.float32

  def split_points(self) -> list[str]:
    """Names of the points the forward pass can start or stop at, in order."""
    return ["embed", *[f"block{i + 1}" for i in range(self.depth)], "norm", "head"]

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False, *, start: str | None = None,
               stop: str | None = None, return_embedding: bool = False):
    """Runs the points from ``start`` (default: the images) up to, excluding, ``stop``.

    Args:
      x: images (B, H, W, C), or the input of point ``start`` (tokens (B, T, D) after ``embed``).
      train: unused (no dropout or BatchNorm), for the training loop's signature.
      start: split point to start from.
      stop: split point to stop before; its input is returned.
      return_embedding: also return the pooled embedding (B, D), the head's input.

    Returns:
      logits (B, num_classes), or ``(logits, embedding)``, or the input of ``stop``.
    """
    del train
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"model.activation={self.activation!r} is unknown for a ViT: use one of {ACTIVATIONS}.")
    act = nn.gelu if self.activation == "gelu" else make_activation(self.activation, self.negative_slope)
    run = network.points_between(self.split_points(), start, stop)
    x = x.astype(self.dtype)
    if "embed" in run:
      x = PatchEmbedding(self.patch_size, self.width, self.dtype, name="embed")(x)
    for i in range(self.depth):
      if f"block{i + 1}" in run:
        x = EncoderBlock(self.num_heads, self.mlp_dim, activation=act, dtype=self.dtype,
                         name=f"block{i + 1}")(x)
    if "norm" in run:
      x = nn.LayerNorm(dtype=self.dtype, name="norm")(x)
    if "head" not in run:
      return x
    emb = jnp.mean(x, axis=1)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(emb).astype(jnp.float32)
    return (logits, emb.astype(jnp.float32)) if return_embedding else logits
