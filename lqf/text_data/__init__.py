"""Text classification data and its subword tokenizer.

Everything is configured by the ``config.data`` section (an ``ml_collections.ConfigDict``):

  name: str     ``'hass_intents'``: the offline default, voice commands sampled from Home
                Assistant's human-written intent templates, split by template
                (`lqf.text_data.intents`; fields ``language``, ``sentences_per_template``,
                ``eval_sentences_per_template``, ``heldout_fraction``, ``test_fraction``,
                ``min_templates``, ``split_seed``, ``slot_values``);
                ``'files'``: the user's CSV/TSV/JSONL files (`lqf.text_data.files`; fields
                ``train_file``, ``test_file``, optional ``heldout_file``, ``text_field``,
                ``label_field``);
                any other name: a prepared TFDS text dataset such as ``'glue/sst2'``,
                ``'ag_news_subset'`` or ``'imdb_reviews'`` (`lqf.text_data.tfds_text`; fields
                ``data_dir``, ``train_split``, ``test_split``, ``text_keys``, ``label_key``).

`load` returns a `TextDataset` of `TextSplit` s (texts, int labels, optional template groups).
`lqf.text_data.tokenizer` trains a byte-level BPE tokenizer on the training texts and encodes
texts to (N, L) int32 ids padded with 0. Typical use::

  dataset = lqf.text_data.load(config.data)
  tok = lqf.text_data.train_tokenizer(dataset.train.texts, vocab_size=2000, max_len=32)
  ids = lqf.text_data.encode(tok, dataset.test.texts)       # (N, 32) int32
"""

import ml_collections

from lqf.text_data import files, intents, tfds_text
from lqf.text_data.dataset import TextDataset, TextSplit
from lqf.text_data.tokenizer import (PAD_ID, TOKENIZER_FILE, decode, encode, load_tokenizer,
                                     max_len, save_tokenizer, train_tokenizer)


def load(data: ml_collections.ConfigDict) -> TextDataset:
  """The dataset named by ``data.name`` (fields in the module docstring)."""
  if data.name == intents.NAME:
    return intents.load(data)
  if data.name == files.NAME:
    return files.load(data)
  return tfds_text.load(data)


__all__ = ["PAD_ID", "TOKENIZER_FILE", "TextDataset", "TextSplit", "decode", "encode", "load",
           "load_tokenizer", "max_len", "save_tokenizer", "train_tokenizer"]
