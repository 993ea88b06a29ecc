"""What every absl entry point shares: the ``--config``/``--workdir`` flags and one-line errors.

A mistake in the input (a config field, a path, a dataset name) ends the program with one line on
stderr naming the field and the fix, and exit status 2, instead of a traceback. ``--debug_errors``
re-raises for the full traceback.
"""

from __future__ import annotations

import logging as std_logging
import sys
from typing import Any, Callable

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_DEBUG = flags.DEFINE_bool("debug_errors", False, "Show the traceback of input errors.")

# Errors that mean "the input is wrong", reported in one line.
INPUT_ERRORS = (ValueError, FileNotFoundError, KeyError, NotADirectoryError, PermissionError)


def quiet_library_logs() -> None:
  """Keeps INFO lines of our code and drops the (very chatty) INFO lines of orbax and grain."""
  def keep(record) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
        lib in record.pathname for lib in ("/orbax/", "/grain/", "/jax/", "/absl/"))
  logging.get_absl_handler().python_handler.addFilter(keep)


def main_for(run: Callable[[ml_collections.ConfigDict, str], Any]) -> Callable[[list[str]], None]:
  """An absl ``main`` that calls ``run(config, workdir)``."""
  def main(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}: use --config and --workdir only.")
    if _CONFIG.value is None or not _WORKDIR.value:
      print("error: --config and --workdir are required, e.g. --config configs/pretrain_mnist.py "
            "--workdir /tmp/run", file=sys.stderr)
      sys.exit(2)
    logging.set_verbosity(logging.INFO)
    quiet_library_logs()
    try:
      run(_CONFIG.value, _WORKDIR.value)
    except INPUT_ERRORS as e:
      if _DEBUG.value:
        raise
      msg = e.args[0] if isinstance(e, KeyError) and e.args else e
      print(f"error: {msg}", file=sys.stderr)
      sys.exit(2)
  return main
