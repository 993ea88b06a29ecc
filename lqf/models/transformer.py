"""The pre-LayerNorm Transformer encoder block shared by the text classifiers and the ViT."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp


class EncoderBlock(nn.Module):
  """Pre-LN Transformer block: x + MHSA(LN(x)); x + MLP(LN(x)), MLP = Dense(mlp_dim) -> σ -> Dense(D).

  Attributes:
    num_heads: attention heads (must divide D).
    mlp_dim: hidden width of the MLP.
    dropout: rate on the attention weights and both residual branches (active only with ``train``).
    activation: the MLP's σ (GELU by default).
    dtype: computation dtype (None: the inputs' and parameters').
  """
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  activation: Callable[[jnp.ndarray], jnp.ndarray] = nn.gelu
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None = None, train: bool = False) -> jnp.ndarray:
    """x (B, L, D) -> (B, L, D); ``mask`` (B, L) restricts attention to the real tokens (None: all)."""
    attention_mask = None if mask is None else nn.make_attention_mask(mask, mask)
    y = nn.LayerNorm(dtype=self.dtype, name="ln1")(x)
    y = nn.MultiHeadDotProductAttention(self.num_heads, dtype=self.dtype, dropout_rate=self.dropout,
                                        deterministic=not train, name="attention")(y, y, mask=attention_mask)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
    y = nn.LayerNorm(dtype=self.dtype, name="ln2")(x)
    y = self.activation(nn.Dense(self.mlp_dim, dtype=self.dtype, name="mlp1")(y))
    y = nn.Dense(x.shape[-1], dtype=self.dtype, name="mlp2")(nn.Dropout(self.dropout, deterministic=not train)(y))
    return x + nn.Dropout(self.dropout, deterministic=not train)(y)
