"""A byte-level BPE subword tokenizer (HuggingFace `tokenizers`) trained on a training split.

Pipeline: normalize (NFKC, lowercase, prepend one space) → byte-level pre-tokenization (every
byte is in the alphabet, so no text is ever unknown) → BPE merges learned from the training texts
→ right-padding with ``[PAD]`` (id `PAD_ID` = 0, which text models read as the padding mask) and
truncation to ``max_len`` tokens. Decoding undoes the byte mapping and strips the prepended space,
so ``decode(encode(x)) == NFKC(x).lower()`` for every text of at most ``max_len`` tokens.

The padding length is part of the saved ``tokenizer.json``: a model's workdir holds the tokenizer
it was trained with, and `load_tokenizer` + `encode` reproduce its inputs exactly.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

PAD_ID = 0
PAD_TOKEN = "[PAD]"
TOKENIZER_FILE = "tokenizer.json"


def train_tokenizer(texts: Iterable[str], *, vocab_size: int, max_len: int,
                    min_frequency: int = 2) -> Tokenizer:
  """Learns BPE merges on ``texts`` (the training split only).

  Args:
    texts: training texts.
    vocab_size: target vocabulary size (256 byte symbols + [PAD] + merges); a small corpus may
      stop below it.
    max_len: encoded length L: longer texts are truncated, shorter ones padded.
    min_frequency: a merge needs a pair seen at least this often.

  Returns:
    The tokenizer, with padding and truncation to ``max_len`` enabled.
  """
  if vocab_size <= 257:
    raise ValueError(f"tokenizer.vocab_size={vocab_size} must exceed 257 (256 bytes + [PAD]).")
  if max_len < 1:
    raise ValueError(f"tokenizer.max_len={max_len} must be a positive number of tokens.")
  tokenizer = Tokenizer(models.BPE())
  tokenizer.normalizer = normalizers.Sequence(
      [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Prepend(" ")])
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                special_tokens=[PAD_TOKEN],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tokenizer.train_from_iterator(texts, trainer)
  if tokenizer.token_to_id(PAD_TOKEN) != PAD_ID:
    raise RuntimeError(f"{PAD_TOKEN} got id {tokenizer.token_to_id(PAD_TOKEN)}, not {PAD_ID}.")
  tokenizer.enable_padding(pad_id=PAD_ID, pad_token=PAD_TOKEN, length=max_len)
  tokenizer.enable_truncation(max_len)
  return tokenizer


def max_len(tokenizer: Tokenizer) -> int:
  """The encoded length L of ``tokenizer`` (its padding length)."""
  if tokenizer.padding is None or tokenizer.padding.get("length") is None:
    raise ValueError("the tokenizer pads to no fixed length: build it with train_tokenizer.")
  return int(tokenizer.padding["length"])


def encode(tokenizer: Tokenizer, texts: Sequence[str]) -> np.ndarray:
  """Token ids (N, L) int32, right-padded with `PAD_ID`."""
  length = max_len(tokenizer)
  if not texts:
    return np.zeros((0, length), np.int32)
  return np.asarray([e.ids for e in tokenizer.encode_batch(list(texts))], np.int32)


def decode(tokenizer: Tokenizer, ids: np.ndarray) -> list[str]:
  """Texts of the rows of ``ids`` (N, L), padding dropped."""
  return tokenizer.decode_batch([[int(i) for i in row if i != PAD_ID] for row in np.asarray(ids)])


def save_tokenizer(tokenizer: Tokenizer, directory: str) -> str:
  """Writes ``directory/tokenizer.json``; returns its path."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, TOKENIZER_FILE)
  tokenizer.save(path)
  return path


def load_tokenizer(directory: str) -> Tokenizer:
  """The tokenizer saved in ``directory`` by `save_tokenizer`."""
  path = os.path.join(directory, TOKENIZER_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no {TOKENIZER_FILE} in {directory!r}: a text model's workdir holds "
                            "the tokenizer it was trained with.")
  return Tokenizer.from_file(path)
