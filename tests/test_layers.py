"""The method is a library: importing it loads nothing that jax, flax and optax do not load already."""

import os
import subprocess
import sys

import lqf

METHOD = ("lqf", "lqf.linearize", "lqf.losses", "lqf.heads", "lqf.kfac", "lqf.nystrom", "lqf.stability",
          "lqf.fit", "lqf.guard", "lqf.solve", "lqf.influence", "lqf.forget", "lqf.mislabel",
          "lqf.task_arithmetic", "lqf.precision", "lqf.checks", "lqf.inference", "lqf.models", "lqf.methods",
          "lqf.nonlinear", "lqf.preconditioners", "lqf.step_rules", "lqf.layers", "lqf.ntk", "lqf.network",
          "lqf.models.vit")
RUNTIME = ("orbax", "grain", "tensorboardX", "ml_collections", "absl", "tensorflow_datasets",
           "tensorflow", "torch", "lqf.runtime", "lqf.data", "lqf.text_data", "lqf.train")


def loaded_after(modules: tuple[str, ...]) -> set[str]:
  """The modules a fresh interpreter holds after importing jax, flax, optax, numpy and then ``modules``,
  minus those it held after the first four."""
  code = ("import sys, jax, flax, optax, numpy; base = set(sys.modules); "
          f"[__import__(m) for m in {list(modules)!r}]; print('\\n'.join(sorted(set(sys.modules) - base)))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  return set(out.stdout.split())


def test_the_method_imports_no_runtime():
  added = loaded_after(METHOD)
  assert {"lqf.fit", "lqf.solve", "lqf.kfac"} <= added  # the check saw the method being imported
  offending = sorted(m for m in added if any(m == r or m.startswith(r + ".") for r in RUNTIME))
  assert not offending, offending


def test_the_runtime_check_sees_the_runtime():
  """The control: the runtime's loop does load orbax and tensorboardX (through its checkpoints and
  metric writer), so the check above would see a method module that imported it."""
  added = loaded_after(("lqf.runtime.loop",))
  assert "orbax" in added and "tensorboardX" in added and "lqf.runtime.checkpoint" in added


def test_every_public_name_is_there_and_in_the_readme():
  readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
  api = readme[readme.index("## Using LQF from Python"):]
  api = api[:api.index("\n## ", 3)]
  missing = [name for name in lqf.__all__ if not hasattr(lqf, name) or f"`{name}`" not in api]
  assert not missing, missing
