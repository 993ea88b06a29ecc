"""One-line checks of a setting: each raises ValueError naming the field, the value and the fix.

Settings classes of the method (`lqf.fit.FitOptions`) and of the studies validate themselves with these;
a config's section name is prefixed by the runtime (`lqf.runtime.config_util.settings`).
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive(field: str, value: Any, example: Any) -> None:
  """Raises ValueError unless ``value`` is a number > 0."""
  if not _is_number(value) or not value > 0:
    raise ValueError(f"{field}={value!r} must be a positive number (e.g. {example}).")


def check_nonnegative(field: str, value: Any, example: Any) -> None:
  """Raises ValueError unless ``value`` is a number ≥ 0."""
  if not _is_number(value) or not value >= 0:
    raise ValueError(f"{field}={value!r} must be a number >= 0 (e.g. {example}).")


def check_count(field: str, value: Any, least: int = 1, *, optional: bool = False) -> None:
  """Raises ValueError unless ``value`` is an integer ≥ ``least`` (or None when ``optional``)."""
  if optional and value is None:
    return
  if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < least:
    none = " or None" if optional else ""
    raise ValueError(f"{field}={value!r} must be an integer >= {least}{none}.")


def check_choice(field: str, value: Any, options: Sequence[Any]) -> None:
  """Raises ValueError unless ``value`` is one of ``options``."""
  if value not in options:
    raise ValueError(f"{field}={value!r} is unknown: use one of {tuple(options)}.")
