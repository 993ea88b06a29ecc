"""Config arguments (`lqf.runtime.config_util.parse_arg`): types, ranges, booleans, unknown keys."""

import pytest

from lqf.runtime import config_util


def test_values_are_typed():
  args = config_util.parse_arg("quick,shots=5,lr=0.5,name=cifar10,classes=5-9",
                               quick=False, shots=1, lr=1.0, name="x", classes=None)
  assert args.quick is True and args.shots == 5 and args.lr == 0.5 and args.name == "cifar10"
  assert args.classes == (5, 6, 7, 8, 9)


@pytest.mark.parametrize("text, value", [("False", False), ("false", False), ("True", True),
                                         ("TRUE", True)])
def test_booleans_are_booleans(text, value):
  """Bug: ``:quick=False`` gave the string "False", which is truthy, so the quick branch ran."""
  args = config_util.parse_arg(f"quick={text}", quick=True)
  assert args.quick is value


def test_unknown_key_names_the_known_ones():
  with pytest.raises(ValueError, match=r"config argument 'shot' is unknown: use some of \['quick', 'shots'\]"):
    config_util.parse_arg("shot=5", quick=False, shots=1)
