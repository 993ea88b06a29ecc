"""The offline default: voice-assistant commands from Home Assistant's intent templates.

Source. The ``home-assistant-intents`` package (PyPI, no dependencies) ships the sentence templates
that Home Assistant's volunteers write by hand for its built-in voice intents, ~40 intents per
language (English 2026.10: 42 intents, 862 templates), e.g. for ``HassTurnOn``::

    <turn> on [(<all>|<the>)] <light> <in> [<the>] {area}

``(a|b)`` is an alternative, ``[x]`` optional, ``(a;b)`` a permutation, ``<rule>`` an expansion
rule (``<turn>`` = ``(turn|switch|change|bring)``) and ``{list}`` a slot. `hassil` (the package
Home Assistant parses them with) parses each template into an expression tree; this module walks
the tree with a seeded random number generator, taking one uniformly random branch at every
alternative and a random order of every permutation, so each draw is one sentence the template
accepts. The label is the intent name.

Slot values. Lists defined in the package are used as they are: value lists (cover classes,
colours, states, ...) and number ranges (a random number of the range, written in digits or, where
the range allows words, in words by `hassil`'s number speller, e.g. "twenty-one point five").
Three lists come from the user's home at run time (``{area}``, ``{floor}``, ``{name}``) and seven
are free-text wildcards (``{message}``, ``{search_query}``, ``{zone}``, ``{timer_name}``,
``{timer_command}``, ``{shopping_list_item}``, ``{todo_list_item}``); their values are drawn from
`SLOT_VALUES` below, a small English vocabulary written for this dataset (a ``{name}`` is drawn
from the names of the entity domains the template's block applies to, e.g. locks for "unlock the
{name}", and from all names when the block names no domain). ``data.slot_values`` replaces any of
these pools. Slot values are shared by all splits: what is held out is the phrasing.

Split by template. Within each intent the templates are shuffled (``data.split_seed``) and cut
into test (``data.test_fraction``), held-out (``data.heldout_fraction``) and train templates, each
part at least one template, so a test sentence is never a sampled variant of a template seen in
training. Intents with fewer than ``data.min_templates`` (≥ 3) templates cannot be cut that way
and are left out (listed in ``info['dropped_intents']``). Each training template yields up to
``data.sentences_per_template`` distinct sentences, each held-out or test template up to
``data.eval_sentences_per_template`` (default: the same; more makes the flip counts less noisy);
a held-out or test sentence that also occurs in training (two templates can share a surface form)
is removed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import hassil.expression as hx
import hassil.intents as hi
import home_assistant_intents
import ml_collections
import numpy as np
from hassil.numbers import get_rbnf_engine
from hassil.parse_expression import parse_sentence
from hassil.util import normalize_whitespace

from lqf.text_data.dataset import TextDataset, TextSplit

NAME = "hass_intents"
CONTEXT_LISTS = ("area", "floor", "name")

# Entity names per Home Assistant domain ({name}), areas, floors and the free-text wildcards.
SLOT_VALUES: dict[str, Any] = {
    "area": ("kitchen", "living room", "bedroom", "master bedroom", "kids room", "bathroom",
             "office", "garage", "hallway", "dining room", "basement", "attic", "porch",
             "backyard", "laundry room", "guest room"),
    "floor": ("first", "second", "ground", "upstairs", "downstairs", "top", "basement"),
    "name": {
        "light": ("ceiling light", "desk lamp", "floor lamp", "porch light", "reading light",
                  "kitchen lights", "night light", "led strip", "chandelier"),
        "switch": ("coffee maker", "christmas tree", "space heater", "dehumidifier",
                   "kettle", "pool pump"),
        "fan": ("ceiling fan", "box fan", "bathroom fan", "attic fan"),
        "cover": ("garage door", "living room blinds", "bedroom curtains", "patio shades",
                  "skylight", "driveway gate"),
        "valve": ("water main", "sprinkler valve", "gas valve"),
        "lock": ("front door", "back door", "side gate", "garage entry"),
        "media_player": ("tv", "living room speaker", "kitchen radio", "soundbar",
                         "bedroom tv", "record player"),
        "climate": ("thermostat", "air conditioner", "heat pump", "upstairs thermostat"),
        "sensor": ("outdoor temperature", "humidity", "power usage", "air quality",
                   "battery level"),
        "binary_sensor": ("back window", "mailbox", "motion sensor", "fridge door",
                          "basement window"),
        "input_boolean": ("guest mode", "vacation mode", "do not disturb"),
        "scene": ("movie time", "good night", "romantic dinner", "morning"),
        "script": ("bedtime routine", "wake up", "leave home"),
        "button": ("doorbell chime", "restart router"),
        "input_button": ("feed the cat",),
        "vacuum": ("roomba", "robot vacuum", "upstairs vacuum"),
        "lawn_mower": ("automower", "robot mower", "front lawn mower"),
        "weather": ("home", "forecast", "cabin"),
        "person": ("anna", "ben", "grandma", "david"),
        "todo": ("shopping", "groceries", "chores", "packing", "hardware store"),
    },
    "message": ("dinner is ready", "the car is here", "it is time for school",
                "please come downstairs", "the movie starts in five minutes", "lights out"),
    "search_query": ("taylor swift", "jazz for a rainy day", "the beatles", "bohemian rhapsody",
                     "classical piano", "the morning news podcast", "lo-fi beats", "coldplay"),
    "zone": ("work", "school", "the gym", "the office", "grandma's house"),
    "timer_name": ("pizza", "laundry", "eggs", "homework", "pasta", "tea", "nap", "oven"),
    "timer_command": ("turn off the lights", "turn on the fan", "open the blinds",
                      "lock the front door", "pause the music"),
    "shopping_list_item": ("milk", "eggs", "bread", "apples", "coffee beans", "toilet paper",
                           "dish soap", "bananas", "olive oil"),
    "todo_list_item": ("call the plumber", "buy stamps", "water the plants", "pay the rent",
                       "clean the gutters", "walk the dog", "milk", "batteries"),
}


@dataclasses.dataclass(frozen=True)
class Template:
  """One sentence template of an intent: its text, parsed expression and sampling context."""
  intent: str
  text: str
  sentence: hx.Sentence
  domains: frozenset[str]
  expansion_rules: Mapping[str, hx.Sentence]
  slot_lists: Mapping[str, hi.SlotList]


def templates(language: str = "en") -> dict[str, list[Template]]:
  """All templates of ``language`` by intent (intents sorted by name, templates in file order)."""
  data = home_assistant_intents.get_intents(language)
  if data is None:
    raise ValueError(f"data.language={language!r} has no intents in home-assistant-intents: use "
                     f"one of {home_assistant_intents.get_languages()}.")
  parsed = hi.Intents.from_dict(data)
  out = {}
  for intent_name in sorted(parsed.intents):
    out[intent_name] = [
        Template(intent_name, text, parse_sentence(text, keep_text=True), frozenset(block.domains),
                 {**parsed.expansion_rules, **block.expansion_rules},
                 {**parsed.slot_lists, **block.slot_lists})
        for block in parsed.intents[intent_name].data for text in block.sentence_texts]
  return out


class _Sampler:
  """Draws random sentences from templates (one random branch per alternative)."""

  def __init__(self, language: str, slot_values: Mapping[str, Any], rng: np.random.Generator):
    self.language, self.values, self.rng = language, slot_values, rng
    self._speller = None

  def sentence(self, template: Template) -> str:
    return normalize_whitespace(self._walk(template.sentence.expression, template)).strip()

  def _choice(self, options):
    return options[int(self.rng.integers(len(options)))]

  def _walk(self, expr: hx.Expression, template: Template) -> str:
    if isinstance(expr, hx.TextChunk):
      return expr.original_text
    if isinstance(expr, hx.Alternative):
      return self._walk(self._choice(expr.items), template)
    if isinstance(expr, hx.Permutation):
      order = self.rng.permutation(len(expr.items))
      return " ".join(self._walk(expr.items[i], template) for i in order)
    if isinstance(expr, hx.Sequence):
      return "".join(self._walk(item, template) for item in expr.items)
    if isinstance(expr, hx.RuleReference):
      return self._walk(template.expansion_rules[expr.rule_name].expression, template)
    if isinstance(expr, hx.ListReference):
      return self._slot(expr, template)
    raise ValueError(f"template {template.text!r} holds an expression hassil added after this "
                     f"module was written ({type(expr).__name__}): update lqf.text_data.intents.")

  def _slot(self, ref: hx.ListReference, template: Template) -> str:
    if ref.is_inline_range:
      start, stop, step = ref.get_inline_range()
      return str(self._choice(range(start, stop + 1, step)))
    slot_list = template.slot_lists.get(ref.list_name)
    if isinstance(slot_list, hi.TextSlotList):
      return self._walk(self._choice(slot_list.values).text_in, template)
    if isinstance(slot_list, hi.RangeSlotList):
      return self._number(slot_list)
    return self._free_value(ref.list_name, template)

  def _number(self, slot_list: hi.RangeSlotList) -> str:
    number = self._choice(list(slot_list.get_numbers()))
    if slot_list.words and (not slot_list.digits or self.rng.random() < 0.5):
      if self._speller is None:
        self._speller = get_rbnf_engine(slot_list.words_language or self.language)
      return self._choice(sorted(set(self._speller.format_number(number).text_by_ruleset.values())))
    return str(number)

  def _free_value(self, list_name: str, template: Template) -> str:
    pool = self.values.get(list_name)
    if pool is None:
      raise ValueError(f"template {template.text!r} needs values for {{{list_name}}}: add "
                       f"data.slot_values.{list_name} (a list of strings).")
    if isinstance(pool, Mapping):  # names by domain
      domains = [d for d in sorted(template.domains) if d in pool] or sorted(pool)
      pool = [name for d in domains for name in pool[d]]
    return self._choice(tuple(pool))


def _split_templates(count: int, heldout_fraction: float, test_fraction: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Random (train, heldout, test) positions of ``count`` ≥ 3 templates, each part non-empty."""
  order = rng.permutation(count)
  num_test = min(max(1, round(test_fraction * count)), count - 2)
  num_heldout = min(max(1, round(heldout_fraction * count)), count - 1 - num_test)
  return (order[num_test + num_heldout:], order[num_test:num_test + num_heldout],
          order[:num_test])


def _check(data: ml_collections.ConfigDict) -> None:
  if data.min_templates < 3:
    raise ValueError(f"data.min_templates={data.min_templates} must be at least 3 (one template "
                     "each for train, held-out and test).")
  for field in ("sentences_per_template", "eval_sentences_per_template"):
    if data.get(field) is not None and data[field] < 1:
      raise ValueError(f"data.{field}={data[field]} must be >= 1.")
  for field in ("heldout_fraction", "test_fraction"):
    if not 0 < data[field] < 1:
      raise ValueError(f"data.{field}={data[field]} must lie in (0, 1).")


def load(data: ml_collections.ConfigDict) -> TextDataset:
  """Builds the dataset (fields: language, sentences_per_template, eval_sentences_per_template,
  heldout_fraction, test_fraction, min_templates, split_seed, slot_values; see the module
  docstring).

  Deterministic for a given config and package version. ``groups`` number the templates of all
  intents (dropped ones included) in `templates` order.
  """
  _check(data)
  slot_values = dict(SLOT_VALUES)
  if data.get("slot_values"):
    slot_values.update(data.slot_values.to_dict() if hasattr(data.slot_values, "to_dict")
                       else data.slot_values)
  by_intent = templates(data.get("language", "en"))
  kept = [name for name, ts in by_intent.items() if len(ts) >= data.min_templates]
  rng = np.random.default_rng(data.split_seed)
  sampler = _Sampler(data.get("language", "en"), slot_values, rng)
  parts = {"train": [], "heldout": [], "test": []}  # (text, label, template id)
  per_template = {"train": data.sentences_per_template,
                  "heldout": data.get("eval_sentences_per_template") or data.sentences_per_template}
  per_template["test"] = per_template["heldout"]
  first_id = dict(zip(by_intent, np.cumsum([0] + [len(ts) for ts in by_intent.values()])))
  for label, name in enumerate(kept):
    positions = _split_templates(len(by_intent[name]), data.heldout_fraction, data.test_fraction,
                                 rng)
    for part, indices in zip(parts, positions):
      for i in sorted(indices):
        drawn = sorted({sampler.sentence(by_intent[name][i])
                        for _ in range(4 * per_template[part])})
        rng.shuffle(drawn)
        parts[part] += [(text, label, int(first_id[name]) + i)
                        for text in drawn[:per_template[part]]]
  seen = {text for text, _, _ in parts["train"]}
  removed = {}
  for part in ("heldout", "test"):
    removed[part] = sum(text in seen for text, _, _ in parts[part])
    parts[part] = [row for row in parts[part] if row[0] not in seen]
  splits = {part: TextSplit(*(tuple(column) for column in zip(*rows)))
            for part, rows in parts.items()}
  info = {"source": f"home-assistant-intents {_version()} ({data.get('language', 'en')})",
          "intents": len(kept), "dropped_intents": sorted(set(by_intent) - set(kept)),
          "templates": {part: len(set(s.groups.tolist())) for part, s in splits.items()},
          "sentences": {part: len(s) for part, s in splits.items()},
          "removed_as_seen_in_train": removed}
  return TextDataset(NAME, tuple(kept), splits["train"], splits["test"], splits["heldout"], info)


def _version() -> str:
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  return metadata.version("home-assistant-intents")
