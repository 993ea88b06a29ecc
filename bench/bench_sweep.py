"""The demo's sweep end to end: compile time vs run time, compiled programs, wall and CPU-seconds.

  python bench/bench_sweep.py                       # the demo (configs/compare_mnist.py), ~8 min on 2 cores
  python bench/bench_sweep.py --arg quick           # its quick variant

Runs ``experiments.compare`` twice, each in its own process and fresh workdir (sources pretrained
again): first with an empty JAX compilation cache, then with the cache the first run filled — what a
rerun, or a second study with the same shapes, sees (`lqf.runtime.compile_cache`). Each run reports its
wall time, CPU-seconds (user + system, `resource.getrusage`), the seconds XLA spent compiling or loading
programs (JAX's ``/jax/core/compile/backend_compile_duration`` events), how many programs it compiled and
how many it loaded from the cache, and the seconds of the 144 fits alone (the rows' ``seconds``). The two runs'
result rows must be equal: a cached program is the program the compiler would build.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(config_arg: str, workdir: str) -> dict:
  """One sweep in this process (the cache folder comes from ``JAX_COMPILATION_CACHE_DIR``)."""
  sys.path.insert(0, ROOT)
  import collections  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel

  from experiments import compare  # pylint: disable=import-outside-toplevel
  from lqf.runtime import compile_cache, config_util, parallel  # pylint: disable=import-outside-toplevel

  counts, seconds = collections.Counter(), collections.defaultdict(float)
  jax.monitoring.register_event_listener(lambda name, **kw: counts.update([name]))

  def on_duration(name, secs, **kw):
    counts.update([name])
    seconds[name] += secs
  jax.monitoring.register_event_duration_secs_listener(on_duration)
  compile_cache.enable(compile_cache.DEFAULT)  # the environment's folder wins
  parallel.single_threaded_blas()
  config = config_util.load_sibling(os.path.join(ROOT, "configs", "x.py"), "compare_mnist", config_arg)
  start = time.perf_counter()
  rows = compare.run(config, workdir)
  wall = time.perf_counter() - start
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
          "compile_s": seconds["/jax/core/compile/backend_compile_duration"],
          # a cache hit records a backend "compile" (its retrieval) too
          "programs_compiled": (counts["/jax/core/compile/backend_compile_duration"]
                                - counts["/jax/compilation_cache/cache_hits"]),
          "cache_hits": counts["/jax/compilation_cache/cache_hits"],
          "fits_s": sum(r["seconds"] for r in rows), "fits": len(rows),
          "rows": [{k: r[k] for k in ("target", "shots", "method", "seed", "accuracy")} for r in rows]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--arg", default="", help="the config argument of configs/compare_mnist.py")
  parser.add_argument("--child", nargs=2, metavar=("WORKDIR", "OUT"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    with open(args.child[1], "w") as f:
      json.dump(child(args.arg, args.child[0]), f)
    return
  root = tempfile.mkdtemp(prefix="bench_sweep_")
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=os.path.join(root, "cache"))
  runs = {}
  for name in ("cold cache", "warm cache"):
    out = os.path.join(root, f"{name.split()[0]}.json")
    subprocess.run([sys.executable, __file__, "--arg", args.arg, "--child", os.path.join(root, name.split()[0]),
                    out], env=env, cwd=ROOT, check=True)
    with open(out) as f:
      runs[name] = json.load(f)
  cold, warm = runs["cold cache"], runs["warm cache"]
  print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"configs/compare_mnist.py{':' + args.arg if args.arg else ''}, {cold['fits']} fits")
  print("| run | wall s | CPU s | XLA compile s | programs compiled | loaded from cache | fits s |")
  print("|---|---|---|---|---|---|---|")
  for name, r in runs.items():
    print(f"| {name} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {r['compile_s']:.0f} | {r['programs_compiled']} | "
          f"{r['cache_hits']} | {r['fits_s']:.0f} |")
  print(f"warm / cold: wall {warm['wall_s'] / cold['wall_s']:.2f}, CPU {warm['cpu_s'] / cold['cpu_s']:.2f}; "
        f"identical rows: {cold['rows'] == warm['rows']}")


if __name__ == "__main__":
  main()
