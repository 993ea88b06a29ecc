"""The entry points' persistent compilation cache (`lqf.runtime.compile_cache`)."""

import os

import jax
import jax.numpy as jnp
from jax.experimental.compilation_cache import compilation_cache

from lqf.runtime import compile_cache


def test_a_program_compiled_once_is_loaded_from_the_folder(tmp_path, monkeypatch):
  """After `enable`, a program is written to the folder, and the same program jitted again elsewhere (a
  new function object, as a new process would build it) is a cache hit; '' leaves the cache off, and
  JAX's own ``JAX_COMPILATION_CACHE_DIR`` wins over the flag."""
  saved = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir", "jax_compilation_cache_max_size",
                                                 "jax_persistent_cache_min_compile_time_secs")}
  hits = []
  jax.monitoring.register_event_listener(
      lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None)
  try:
    assert compile_cache.enable(str(tmp_path / "flag")) == os.environ["JAX_COMPILATION_CACHE_DIR"]
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    assert compile_cache.enable("") is None
    folder = compile_cache.enable(str(tmp_path / "cache"))
    compilation_cache.reset_cache()
    assert folder == str(tmp_path / "cache") and jax.config.jax_compilation_cache_dir == folder
    x = jnp.arange(12.0).reshape(3, 4)
    first = jax.jit(lambda a: jnp.tanh(a) @ a.T + 17.0)(x)
    assert os.listdir(folder)  # the compiled program is stored
    before = len(hits)
    second = jax.jit(lambda a: jnp.tanh(a) @ a.T + 17.0)(x)
    assert len(hits) > before  # loaded, not compiled
    assert jnp.array_equal(first, second)
  finally:  # the session's cache as it was (tests/conftest.py)
    for key, value in saved.items():
      jax.config.update(key, value)
    compilation_cache.reset_cache()
