"""Tests of lqf.text_data: tokenizer, template-split intents, CSV/TSV/JSONL files, TFDS (mocked)."""

import itertools
import json
import unicodedata

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from hassil.intents import TextSlotList
from hassil.sample import sample_expression
from hassil.util import normalize_whitespace

from lqf import text_data
from lqf.text_data import files, intents

TEXTS = ["Turn on the kitchen lights", "what's the weather like?", "set a timer for 5 minutes",
         "turn off the lights", "is the front door locked", "set the thermostat to 21 degrees"] * 3


def test_tokenizer_round_trip_is_nfkc_lowercase_and_pads_with_zero():
  tok = text_data.train_tokenizer(TEXTS, vocab_size=300, max_len=40)
  probes = [*TEXTS[:6], "Ünïcödé ß 東京 😀 never seen", "  two  spaces ", "ﬁ ligature"]
  ids = text_data.encode(tok, probes)
  assert ids.shape == (len(probes), 40) and ids.dtype == np.int32
  assert text_data.decode(tok, ids) == [unicodedata.normalize("NFKC", t).lower() for t in probes]
  lengths = (ids != text_data.PAD_ID).sum(1)
  assert all((row[n:] == 0).all() and (row[:n] != 0).all() for row, n in zip(ids, lengths))
  # Merges were learned: a frequent word is one token, shorter than its bytes.
  assert lengths[0] < len(" turn on the kitchen lights")


def test_tokenizer_saves_length_and_merges(tmp_path):
  tok = text_data.train_tokenizer(TEXTS, vocab_size=300, max_len=6)
  text_data.save_tokenizer(tok, str(tmp_path))
  again = text_data.load_tokenizer(str(tmp_path))
  assert text_data.max_len(again) == 6
  np.testing.assert_array_equal(text_data.encode(again, TEXTS), text_data.encode(tok, TEXTS))
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    text_data.load_tokenizer(str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="tokenizer.vocab_size=100"):
    text_data.train_tokenizer(TEXTS, vocab_size=100, max_len=6)


def _intents_config(**overrides):
  fields = dict(name="hass_intents", language="en", sentences_per_template=2,
                eval_sentences_per_template=3, heldout_fraction=0.2, test_fraction=0.3,
                min_templates=3, split_seed=0, slot_values=None)
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


@pytest.fixture(scope="module")
def intent_data():
  return text_data.load(_intents_config())


def test_intents_are_split_by_template(intent_data):
  by_intent = intents.templates("en")
  kept = [name for name, ts in by_intent.items() if len(ts) >= 3]
  assert intent_data.class_names == tuple(kept)
  assert set(intent_data.info["dropped_intents"]) == set(by_intent) - set(kept)
  splits = {"train": intent_data.train, "heldout": intent_data.heldout, "test": intent_data.test}
  groups = {name: set(s.groups.tolist()) for name, s in splits.items()}
  assert not groups["train"] & groups["test"] and not groups["train"] & groups["heldout"]
  assert not groups["heldout"] & groups["test"]
  assert not set(intent_data.train.texts) & set(intent_data.test.texts)
  for name, split in splits.items():  # every intent has a template in every split
    assert set(split.labels.tolist()) == set(range(len(kept))), name
  # Template ids number the templates of all intents in order; each text's label is its intent's.
  offsets = np.cumsum([0] + [len(ts) for ts in by_intent.values()])
  owner = {i: name for name, lo, hi in zip(by_intent, offsets, offsets[1:]) for i in range(lo, hi)}
  for split in splits.values():
    assert all(owner[g] == kept[y] for g, y in zip(split.groups, split.labels))
  counts = np.bincount(intent_data.test.groups)
  assert counts.max() <= 3 and np.bincount(intent_data.train.groups).max() <= 2


@pytest.mark.parametrize("intent", ["HassGetCurrentTime", "HassRespond", "HassMediaNext",
                                    "HassCancelAllTimers", "HassMediaPause"])
def test_random_sentences_are_among_hassils_own_expansions(intent):
  context = {k: TextSlotList.from_strings(
      sorted({n for pool in v.values() for n in pool}) if isinstance(v, dict) else v)
             for k, v in intents.SLOT_VALUES.items() if k in intents.CONTEXT_LISTS}
  sampler = intents._Sampler(  # pylint: disable=protected-access
      "en", intents.SLOT_VALUES, np.random.default_rng(0))
  for template in intents.templates("en")[intent]:
    expansions = {normalize_whitespace(t).strip() for t in itertools.islice(
        sample_expression(template.sentence.expression, {**template.slot_lists, **context},
                          template.expansion_rules), 20001)}
    assert len(expansions) <= 20000, template.text
    drawn = {sampler.sentence(template) for _ in range(300)}
    assert drawn <= expansions, (template.text, drawn - expansions)
    if len(expansions) <= 12:  # every branch of a small template is reachable
      assert drawn == expansions, template.text


def test_intents_are_deterministic_and_errors_name_the_field(intent_data):
  again = text_data.load(_intents_config())
  assert again.test.texts == intent_data.test.texts and again.train.texts == intent_data.train.texts
  other = text_data.load(_intents_config(split_seed=1))
  assert other.test.texts != intent_data.test.texts
  with pytest.raises(ValueError, match="data.min_templates=2"):
    text_data.load(_intents_config(min_templates=2))
  with pytest.raises(ValueError, match="data.language='xx'"):
    text_data.load(_intents_config(language="xx"))
  narrowed = text_data.load(_intents_config(slot_values={"area": ["zz-room"]}))
  assert any("zz-room" in t for t in narrowed.train.texts)
  only_areas = ("master bedroom", "laundry room", "guest room", "dining room")  # in no other pool
  assert any(a in t for t in intent_data.train.texts for a in only_areas)
  assert not any(a in t for t in narrowed.train.texts for a in only_areas)


def _write(path, text):
  path.write_text(text, encoding="utf-8")
  return str(path)


def test_csv_tsv_and_jsonl_read_the_same_examples(tmp_path):
  csv_path = _write(tmp_path / "a.csv", 'id,text,label\n1,"lights, on please",on\n2,lights off,'
                                        'off\n3,"say ""hi""",on\n')
  tsv_path = _write(tmp_path / "a.tsv", 'text\tlabel\nlights, on please\ton\nlights off\toff\n'
                                        'say "hi"\ton\n')
  rows = [{"text": "lights, on please", "label": "on"}, {"text": "lights off", "label": "off"},
          {"text": 'say "hi"', "label": "on", "extra": 1}]
  jsonl_path = _write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
  expected = [("lights, on please", "on"), ("lights off", "off"), ('say "hi"', "on")]
  for path in (csv_path, tsv_path, jsonl_path):
    assert [(t, y) for _, t, y in files.read_examples(path)] == expected
  data = text_data.load(ml_collections.ConfigDict(dict(
      name="files", train_file=csv_path, test_file=jsonl_path, heldout_file=None)))
  assert data.class_names == ("off", "on") and data.heldout is None
  np.testing.assert_array_equal(data.test.labels, [1, 0, 1])


def test_integer_labels_sort_numerically(tmp_path):
  path = _write(tmp_path / "n.jsonl", "".join(json.dumps({"text": f"t{k}", "label": k}) + "\n"
                                              for k in (10, 2, 1)))
  data = text_data.load(ml_collections.ConfigDict(dict(name="files", train_file=path,
                                                       test_file=path)))
  assert data.class_names == ("1", "2", "10")
  np.testing.assert_array_equal(data.train.labels, [2, 1, 0])


@pytest.mark.parametrize("name, content, message", [
    ("extra.csv", "text,label\nok,a\nturn on, the lights,b\n", r"extra.csv line 3: 3 fields"),
    ("short.tsv", "text\tlabel\nok\ta\nno label here\n", r"short.tsv line 3: 1 fields"),
    ("empty_label.csv", "text,label\nok,a\nfine,\n", r"empty_label.csv line 3: the 'label' field"),
    ("header.csv", "sentence,label\nok,a\n", r"header.csv line 1: .*no column 'text'"),
    ("quote.csv", 'text,label\nok,a\n"open quote,b\n', r"quote.csv line \d+:"),
    ("bad.jsonl", '{"text": "ok", "label": "a"}\n{"text": "oops", "label": }\n',
     r"bad.jsonl line 2: not valid JSON"),
    ("keys.jsonl", '{"text": "ok", "label": "a"}\n\n{"sentence": "x", "label": "a"}\n',
     r"keys.jsonl line 3: expected a JSON object with keys 'text' and 'label'"),
    ("types.jsonl", '{"text": 3, "label": "a"}\n', r"types.jsonl line 1: 'text' must be a string"),
])
def test_malformed_files_are_rejected_in_one_line_naming_the_row(tmp_path, name, content,
                                                                 message):
  path = _write(tmp_path / name, content)
  with pytest.raises(ValueError, match=message) as error:
    files.read_examples(path)
  assert "\n" not in str(error.value)


def test_unknown_test_label_and_missing_fields_are_named(tmp_path):
  train = _write(tmp_path / "train.csv", "text,label\nhi,a\nho,b\n")
  test = _write(tmp_path / "test.csv", "text,label\nhi,a\nhey,c\n")
  config = ml_collections.ConfigDict(dict(name="files", train_file=train, test_file=test))
  with pytest.raises(ValueError, match=r"test.csv line 3: label 'c' is not among the classes"):
    text_data.load(config)
  with pytest.raises(ValueError, match="data.test_file"):
    text_data.load(ml_collections.ConfigDict(dict(name="files", train_file=train,
                                                  test_file=None)))
  with pytest.raises(ValueError, match="unknown extension '.txt'"):
    files.read_examples(_write(tmp_path / "x.txt", "hi"))


def _tfds_config(name, **overrides):
  fields = dict(name=name, data_dir=None, train_split=None, test_split=None, text_keys=None,
                label_key=None)
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


@pytest.mark.parametrize("name, keys, test_split", [
    ("ag_news_subset", ("title", "description"), "test"),
    ("glue/sst2", ("sentence",), "validation"),
    ("imdb_reviews", ("text",), "test")])
def test_tfds_text_datasets_through_mock_data(name, keys, test_split):
  with tfds.testing.mock_data(num_examples=7):
    data = text_data.load(_tfds_config(name))
    raw = tfds.data_source(name, split=test_split, download=False)
    expected = [". ".join(raw[i][k] if isinstance(raw[i][k], str) else raw[i][k].decode()
                          for k in keys) for i in range(7)]
    assert list(data.test.texts) == expected
    np.testing.assert_array_equal(data.test.labels, [int(raw[i]["label"]) for i in range(7)])
    assert len(data.train) == 7 and data.heldout is None
    assert data.num_classes == tfds.builder(name).info.features["label"].num_classes
    with pytest.raises(ValueError, match="data.text_keys holds 'nope'"):
      text_data.load(_tfds_config(name, text_keys=("nope",)))


def test_unknown_tfds_name_is_one_line():
  with pytest.raises(ValueError, match="data.name='no_such_text_set' is not a TFDS dataset"):
    text_data.load(_tfds_config("no_such_text_set"))


def test_a_text_longer_than_the_csv_field_limit_is_read(tmp_path):
  """The csv module refuses fields over 131,072 characters by default, which used to be reported as
  unquoted delimiters; such texts are read, and the module's limit is restored afterwards."""
  import csv  # pylint: disable=g-import-not-at-top
  limit = csv.field_size_limit()
  long_text = "turn on the light " * 10_000  # 180,000 characters
  path = _write(tmp_path / "long.csv", f'text,label\n"{long_text}",on\nshort,off\n')
  assert [(t, y) for _, t, y in files.read_examples(str(path))] == [(long_text, "on"), ("short", "off")]
  assert csv.field_size_limit() == limit
