"""What every absl entry point shares: the ``--config``/``--workdir`` flags, one-line errors, interrupts.

A mistake in the input (a flag, a config field, a path, a dataset name), a full or unwritable disk, a
workdir held by another live run, or a run stopped by the divergence guard ends the program with one line
on stderr, ``error: ...``, naming what is wrong, the field and the fix, and exit status 2, instead of a
traceback. ``--debug_errors`` re-raises for the full traceback. Compiled programs are kept in JAX's
persistent cache (``--compilation_cache``, `lqf.runtime.compile_cache`). SIGINT (Ctrl-C) and SIGTERM stop the run
at the next safe point with one line saying where a rerun resumes, and exit status 130 / 143
(`lqf.runtime.interrupt`). ``--help`` prints the entry point's and the config file's docstrings (launch commands,
arguments, methods) and the flags. An entry point is::

  if __name__ == "__main__":
    cli.launch(run)          # run(config, workdir)
"""

from __future__ import annotations

import errno
import importlib.util
import logging as std_logging
import re
import sys
from typing import Any, Callable, NoReturn

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from lqf.runtime import checkpoint as ckpt_lib
from lqf.runtime import compile_cache, interrupt, parallel

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_DEBUG = flags.DEFINE_bool("debug_errors", False, "Show the traceback of input errors.")
_CACHE = flags.DEFINE_string("compilation_cache", compile_cache.DEFAULT,
                             "Folder of JAX's persistent compilation cache ('' turns it off).")

# Errors reported in one line: bad input (ValueError, KeyError, FileNotFoundError, ...), storage
# (OSError: no space left, not writable) and the divergence guard (FloatingPointError).
REPORTED_ERRORS = (ValueError, KeyError, OSError, FloatingPointError)
EXIT_ERROR = 2


def quiet_library_logs() -> None:
  """Keeps INFO lines of our code and drops the (very chatty) INFO lines of orbax and grain."""
  def keep(record) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
        lib in record.pathname for lib in ("/orbax/", "/grain/", "/jax/", "/absl/"))
  logging.get_absl_handler().python_handler.addFilter(keep)


def _fail(message: str) -> NoReturn:
  """Prints ``error: message`` as one line on stderr and exits with status 2."""
  line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
  print(f"error: {line}", file=sys.stderr)
  sys.exit(EXIT_ERROR)


def describe(error: BaseException) -> str:
  """The one-line message for an error of `REPORTED_ERRORS`.

  Our own errors carry their message; a raw ``OSError`` from the system (``[Errno 28] No space left on
  device: 'path'``) gets the fix added: free space or choose another ``--workdir``, then rerun the same
  command, which resumes from the last complete checkpoint.
  """
  if isinstance(error, KeyError) and error.args:
    return str(error.args[0])
  if isinstance(error, OSError) and error.strerror:
    where = f" ({error.filename})" if error.filename else ""
    fix = "free disk space" if error.errno == errno.ENOSPC else "check the path and its permissions"
    return (f"{error.strerror}{where}: {fix} or use another --workdir, then rerun the same command "
            "(it resumes from the last complete checkpoint).")
  return str(error)


def report_errors(run: Callable[[ml_collections.ConfigDict, str], Any], config: ml_collections.ConfigDict,
                  workdir: str, *, debug: bool = False) -> Any:
  """``run(config, workdir)``; an error of `REPORTED_ERRORS` becomes one stderr line and exit status 2.

  With ``debug`` the error propagates with its traceback.
  """
  try:
    return run(config, workdir)
  except REPORTED_ERRORS as e:
    if debug:
      raise
    _fail(describe(e))
  except interrupt.Interrupted as e:
    print(f"error: {e.message()}", file=sys.stderr)
    sys.exit(interrupt.EXIT_STATUS[e.signum])
  finally:
    ckpt_lib.release_locks()


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing whose errors are one line (absl prints two; a misspelt config field, a traceback).

  Handles unknown flags, values of the wrong type (``--config.num_steps=abc``), fields the config does
  not have (``--config.nope=1``) and errors raised by a config file's ``get_config``; ``--help`` prints
  the docstrings (`print_help`).
  """
  if any(a in ("-h", "--help", "-?", "--helpshort", "--helpfull") for a in argv[1:]):
    print_help(argv)
    sys.exit(0)
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: an override names a missing field
    while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(message))
      e = e.args[0]
    lines = str(e.args[0] if e.args else e).splitlines()  # ["'widht'", 'Did you mean "width" ...?']
    field = lines[0].strip("'\"")
    given = [a for a in argv[1:] if re.match(rf"--?config\.(.+\.)?{re.escape(field)}(\.|=|$)", a)]
    hint = f" {lines[1].strip()}" if len(lines) > 1 else " Check its spelling in the config file."
    _fail(f"{given[0] if given else '--config.' + field} names a field the config does not have: "
          f"{field!r}.{hint}")
  except flags.Error as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    cause = f": {lines[-1]}" if len(lines) > 1 else ""  # e.g. the ValueError raised by get_config
    _fail(f"{lines[0].rstrip(':')}{cause}")


def print_help(argv: list[str]) -> None:
  """The entry point's docstring, the ``--config`` file's docstring (launch command, arguments,
  expected results) when one is given, and the flags."""
  main = sys.modules.get("__main__")
  print((main.__doc__ or "").strip() if main else "")
  given = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
  given += [argv[i + 1] for i, a in enumerate(argv[1:-1], 1) if a == "--config"]
  if given:
    path = given[0].split(":", 1)[0]
    try:
      spec = importlib.util.spec_from_file_location("_config_help", path)
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      print(f"\n--config {path}:\n\n{(module.__doc__ or '(no docstring)').strip()}")
    except (OSError, AttributeError, ImportError) as e:
      print(f"\n--config {path} cannot be loaded ({e}).")
  else:
    print("\nAdd --config=configs/<name>.py to see that config's arguments and launch command.")
  print("\nFlags: --config=<file>[:<arguments>] --config.<field>=<value> --workdir=<dir> "
        "[--debug_errors] [--compilation_cache=<dir>, '' for none]")


def _loaded_config() -> ml_collections.ConfigDict:
  """``--config``'s value; a file that could not be loaded is reported in one line."""
  config = _CONFIG.value
  try:
    config.get("seed")
  except OSError as e:
    cause = str(e.__cause__ or e).strip().splitlines()[-1].strip()
    _fail(f"--config cannot be loaded ({cause}): check the config file path.")
  return config


def _refusing_held_workdirs(run: Callable[[ml_collections.ConfigDict, str], Any]):
  """``run`` preceded by the check that no other live run holds the workdir (before any work); a
  distributed run connects its processes first, so that only process 0 checks."""
  def checked(config: ml_collections.ConfigDict, workdir: str) -> Any:
    parallel.initialize_distributed(config.get("distributed", False))
    ckpt_lib.check_not_locked(workdir)
    return run(config, workdir)
  return checked


def main_for(run: Callable[[ml_collections.ConfigDict, str], Any]) -> Callable[[list[str]], None]:
  """An absl ``main`` that calls ``run(config, workdir)`` with one-line errors."""
  def main(argv: list[str]) -> None:
    if len(argv) > 1:
      _fail(f"unexpected arguments {argv[1:]}: use --config and --workdir only.")
    if _CONFIG.value is None or not _WORKDIR.value:
      _fail("--config and --workdir are required, e.g. --config configs/pretrain_mnist.py "
            "--workdir /tmp/run")
    config = _loaded_config()
    logging.set_verbosity(logging.INFO)
    quiet_library_logs()
    interrupt.install()
    parallel.single_threaded_blas()
    compile_cache.enable(_CACHE.value)
    report_errors(_refusing_held_workdirs(run), config, _WORKDIR.value, debug=_DEBUG.value)
  return main


def launch(run: Callable[[ml_collections.ConfigDict, str], Any]) -> None:
  """Runs an entry point: parses the flags (`parse_flags`) and calls ``run(config, workdir)``."""
  app.run(main_for(run), flags_parser=parse_flags)
