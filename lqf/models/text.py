"""Flax text classifiers over padded token ids, with the ResNets' output convention.

Every model maps token ids (B, L) int32, padded with 0 (`lqf.text_data.PAD_ID`: the padding mask
is ``tokens != 0``), to logits (B, K) in the parameters' dtype (float32), or with
``return_embedding=True`` to ``(logits, embedding)`` with the pooled representation (B, D) that
the linear ``head`` reads — so every `compat` loss and metric applies to them as to the image
models. ``train=True`` turns on
dropout (pass ``rngs={'dropout': key}``); there is no BatchNorm, so there are no batch statistics.

* `TransformerClassifier`: token + learned position embeddings, ``depth`` pre-LayerNorm encoder
  blocks (multi-head self-attention with the padding mask, then a GELU MLP, each residual), a
  final LayerNorm, then mean pooling over the real tokens or a learned [CLS] vector prepended to
  the sequence (``pooling``).
* `ConvClassifier`: a 1-D CNN (Kim 2014): token embeddings, one ReLU convolution per kernel size
  (same padding), max-pooling over the real positions, concatenated.
* `BagOfEmbeddingsClassifier`: the mean of the real tokens' embeddings, then a ReLU hidden layer.

A sequence without any real token pools to zeros (never NaN).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from lqf.models.transformer import EncoderBlock

TEXT_MODELS = ("transformer", "cnn", "bag_of_embeddings")
POOLINGS = ("mean", "cls")


def padding_mask(tokens: jnp.ndarray) -> jnp.ndarray:
  """(B, L) bool: True at real tokens (id ≠ 0)."""
  return tokens != 0


def masked_mean(x: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  """Σ_t mask_t x_t / max(Σ_t mask_t, 1) over axis 1: (B, L, D), (B, L) → (B, D)."""
  weights = mask[..., None].astype(x.dtype)
  return jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


def masked_max(x: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  """max_t over the real positions (0 for a sequence without any): (B, L, D), (B, L) → (B, D)."""
  pooled = jnp.max(jnp.where(mask[..., None], x, -jnp.inf), axis=1)
  return jnp.where(jnp.any(mask, axis=1)[:, None], pooled, 0.0)


def _head(num_classes: int, emb: jnp.ndarray, return_embedding: bool):
  logits = nn.Dense(num_classes, name="head")(emb)
  return (logits, emb) if return_embedding else logits


class TransformerClassifier(nn.Module):
  """Transformer encoder classifier.

  Attributes:
    vocab_size: number of token ids (id 0 is padding).
    num_classes: K.
    max_len: the longest sequence L the position embedding covers.
    width: model width D (the embedding dimension).
    depth: number of encoder blocks.
    num_heads: attention heads (must divide ``width``).
    mlp_dim: hidden width of each block's MLP.
    dropout: dropout rate on attention weights, residual branches and embeddings.
    pooling: ``'mean'`` over real tokens or ``'cls'`` (a learned vector prepended, its output).
  """
  vocab_size: int
  num_classes: int
  max_len: int
  width: int = 64
  depth: int = 2
  num_heads: int = 4
  mlp_dim: int = 128
  dropout: float = 0.1
  pooling: str = "mean"

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, train: bool = False, return_embedding: bool = False):
    """tokens (B, L ≤ max_len) int → logits (B, K), or (logits, embedding (B, width))."""
    if self.pooling not in POOLINGS:
      raise ValueError(f"model.pooling={self.pooling!r} is unknown: use one of {POOLINGS}.")
    if tokens.shape[1] > self.max_len:
      raise ValueError(f"sequences of {tokens.shape[1]} tokens exceed model max_len="
                       f"{self.max_len}: encode with the model's own tokenizer.")
    mask = padding_mask(tokens)
    x = nn.Embed(self.vocab_size, self.width, name="embed")(tokens)
    positions = self.param("pos_embedding", nn.initializers.normal(0.02),
                           (self.max_len, self.width))
    x = x + positions[None, :tokens.shape[1]]
    if self.pooling == "cls":
      cls = self.param("cls", nn.initializers.normal(0.02), (self.width,))
      x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)), x], axis=1)
      mask = jnp.concatenate([jnp.ones((x.shape[0], 1), bool), mask], axis=1)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    for i in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim, self.dropout, name=f"block{i + 1}")(
          x, mask, train)
    x = nn.LayerNorm(name="ln_final")(x)
    emb = x[:, 0] if self.pooling == "cls" else masked_mean(x, mask)
    return _head(self.num_classes, emb, return_embedding)


class ConvClassifier(nn.Module):
  """1-D CNN: embeddings → ReLU conv per kernel size → max over real positions → concat → head.

  Padding embeddings are zeroed, so the logits do not depend on how much padding follows a text.

  Attributes:
    vocab_size, num_classes: as in `TransformerClassifier`.
    width: embedding dimension and channels per kernel size (D = width · len(kernel_sizes)).
    kernel_sizes: convolution widths in tokens.
    dropout: dropout rate on the pooled features.
  """
  vocab_size: int
  num_classes: int
  width: int = 64
  kernel_sizes: Sequence[int] = (2, 3, 4)
  dropout: float = 0.1

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, train: bool = False, return_embedding: bool = False):
    """tokens (B, L) int → logits (B, K), or (logits, embedding (B, width·len(kernel_sizes)))."""
    mask = padding_mask(tokens)
    # Zeroed at padding, so a convolution sees past the end of the text exactly as at L.
    x = nn.Embed(self.vocab_size, self.width, name="embed")(tokens) * mask[..., None]
    pooled = [masked_max(nn.relu(nn.Conv(self.width, (k,), padding="SAME", name=f"conv{k}")(x)),
                         mask) for k in self.kernel_sizes]
    emb = nn.Dropout(self.dropout, deterministic=not train)(jnp.concatenate(pooled, axis=-1))
    return _head(self.num_classes, emb, return_embedding)


class BagOfEmbeddingsClassifier(nn.Module):
  """Mean of the real tokens' embeddings → ReLU Dense(width) → head.

  The embedding (B, width) is the hidden layer.
  """
  vocab_size: int
  num_classes: int
  width: int = 64
  dropout: float = 0.1

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, train: bool = False, return_embedding: bool = False):
    """tokens (B, L) int → logits (B, K), or (logits, embedding (B, width))."""
    x = masked_mean(nn.Embed(self.vocab_size, self.width, name="embed")(tokens),
                    padding_mask(tokens))
    emb = nn.relu(nn.Dense(self.width, name="hidden")(x))
    emb = nn.Dropout(self.dropout, deterministic=not train)(emb)
    return _head(self.num_classes, emb, return_embedding)


def create_text_model(config: ml_collections.ConfigDict, num_classes: int, vocab_size: int,
                      max_len: int) -> nn.Module:
  """Builds the text model named by ``config`` (the ``model`` section of a text config).

  Fields: ``name`` (one of `TEXT_MODELS`), ``width``, ``dropout``; transformer: ``depth``,
  ``num_heads``, ``mlp_dim``, ``pooling``; cnn: ``kernel_sizes``. ``vocab_size`` and
  ``max_len`` come from the tokenizer.
  """
  common = dict(vocab_size=vocab_size, num_classes=num_classes, width=config.width,
                dropout=config.get("dropout", 0.1))
  if config.name == "transformer":
    if config.width % config.num_heads:
      raise ValueError(f"model.num_heads={config.num_heads} must divide model.width="
                       f"{config.width}.")
    return TransformerClassifier(max_len=max_len, depth=config.depth, num_heads=config.num_heads,
                                 mlp_dim=config.get("mlp_dim", 2 * config.width),
                                 pooling=config.get("pooling", "mean"), **common)
  if config.name == "cnn":
    return ConvClassifier(kernel_sizes=tuple(config.get("kernel_sizes", (2, 3, 4))), **common)
  if config.name == "bag_of_embeddings":
    return BagOfEmbeddingsClassifier(**common)
  raise ValueError(f"model.name={config.name!r} is unknown for text: use one of {TEXT_MODELS}.")
