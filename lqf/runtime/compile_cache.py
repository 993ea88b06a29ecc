"""JAX's persistent compilation cache for the entry points: compile a program once per machine.

A sweep, a rerun or a second study with the same shapes compiles the same XLA programs again; with the
cache on, JAX stores each compiled program under its key (the program, the compiler options, the
device) in a folder and loads it instead of compiling. Every entry point turns it on
(`lqf.runtime.cli`, flag ``--compilation_cache``): by default in ``$XDG_CACHE_HOME/lqf/jax`` (else
``~/.cache/lqf/jax``), at most `MAX_BYTES` (least recently used programs are evicted); an empty value turns
it off. JAX's own environment settings (``JAX_COMPILATION_CACHE_DIR`` and the thresholds) win.

The cache is a machine setting, not part of an experiment: it is a flag, not a config field, so that a
rerun with another cache folder is still the same run (`lqf.runtime.checkpoint.claim_workdir` compares
configs). A cached program is the program the compiler would build, so results do not change.
"""

from __future__ import annotations

import os

import jax

DEFAULT = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "lqf", "jax")
MAX_BYTES = 4 * 2 ** 30


def enable(directory: str | None) -> str | None:
  """Turns JAX's persistent compilation cache on in ``directory`` (None or '': off) and caches every
  program (on CPU most compile in under JAX's default threshold of 1 s); returns the folder in use (None:
  off). JAX's own environment settings win: ``JAX_COMPILATION_CACHE_DIR`` (the folder),
  ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` and ``JAX_COMPILATION_CACHE_MAX_SIZE``."""
  directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or (directory and os.path.expanduser(directory))
  if not directory:
    return None
  jax.config.update("jax_compilation_cache_dir", directory)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  return directory
