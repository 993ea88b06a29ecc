r"""Should a sweep's fits run as one program? The demo's LQF fit: one seed at a time vs batched, side by side.

  python bench/bench_batched_fits.py --source /tmp/lqf_demo/source_leaky   # a compare workdir's source
  python bench/bench_batched_fits.py                                       # pretrains one first (~20 s)

For each shot count, the demo's cells (`configs/compare_mnist.py`: target ``mnist5k_5-9``, its LQF settings:
last stage + head linearized, K-FAC, the exact quadratic step, 40 full-batch steps) are built for
``--seeds`` seeds as the sweep builds them (`lqf.runtime.task`: the k-shot draw, the ridge head, the cached
features, the K-FAC factors). Then the same 40 steps of the early-stopped fit's full-batch update (method
``lqf_steps``) run three ways:

* ``one by one`` — what `lqf.fit.fit_linearized` does: per seed, a Python loop over one jitted step;
* ``vmap seeds`` — one jitted step for all seeds (``jax.vmap`` over δ, the optimizer state, f0, the
  tangent map and the targets), a Python loop over steps;
* ``scan steps`` — per seed, the 40 steps as one program (``jax.lax.scan``); only at the shot counts of
  ``--scan_shots`` (it is slow on CPU, jax-ml/jax#12868).

Each way is run twice: the first call's wall time includes compiling (``compile + run``), the second is
the run alone (``run``, with its CPU-seconds of this process). ``max |Δδ|`` compares the final δ of all seeds
with the one-by-one fits' (float32 rounding of a differently compiled program, amplified by 40 steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from experiments import common  # noqa: E402
from experiments import finetune as finetune_experiment  # noqa: E402
from lqf import data as data_lib  # noqa: E402
from lqf import fit as fit_lib  # noqa: E402
from lqf import guard, methods  # noqa: E402
from lqf.linearize import jit_tangent  # noqa: E402
from lqf.losses import one_hot_targets  # noqa: E402
from lqf.models import create_model  # noqa: E402
from lqf.runtime import config_util, parallel  # noqa: E402
from lqf.runtime import task as task_lib  # noqa: E402

TARGET = "mnist5k_5-9"


def cell(source, target, lqf, shots: int, seed: int) -> dict:
  """One seed's fit, ready to step: the loop state at δ = 0 and the step's arguments."""
  model_config, variables = source
  data = ml_collections.ConfigDict(target.to_dict())
  data.shots, data.shot_seed = shots, seed
  x, y = data_lib.load_arrays(data, data.train_split)
  num_classes = data_lib.num_classes(data)
  emb = task_lib.embed(create_model(model_config, num_classes), variables, x)
  model, variables = task_lib.with_new_head(model_config, variables, emb, y, num_classes,
                                            head_init=lqf.head_init, target_scale=lqf.target_scale,
                                            head_ridge=lqf.head_ridge, seed=seed)
  task = task_lib.Task(model, variables, (x, y))
  lin, features = task.linearized(lqf.trainable), task.features(lqf.trainable, "train")
  delta = lin.init_delta(variables)
  tx = fit_lib.make_optimizer(lqf.fit, curvature=task.curvature(lqf.trainable, lqf.fit),
                              sqrt_curvature_like=(jax.ShapeDtypeStruct(features.f0.shape, jnp.float32), delta))
  f0, jvp = jit_tangent(lin, variables, features.h)
  state = guard.init(fit_lib.FitState(delta, tx.init(delta), jnp.zeros(features.f0.shape, jnp.float32)))
  return {"state": state, "args": (f0, jvp, one_hot_targets(jnp.asarray(y), num_classes, lqf.target_scale)),
          "tx": tx}


def timed(fn) -> tuple[float, float, object]:
  """(wall s, CPU s of this process, result) of ``fn()`` run to completion."""
  wall, cpu = time.perf_counter(), time.process_time()
  out = jax.block_until_ready(fn())
  return time.perf_counter() - wall, time.process_time() - cpu, out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--source", help="a pretrained source workdir (default: pretrain one)")
  parser.add_argument("--shots", default="1,5,10,25")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--scan_shots", default="1,5")
  args = parser.parse_args()
  parallel.single_threaded_blas()
  config = config_util.load_sibling(os.path.join(ROOT, "configs", "x.py"), "compare_mnist", "")
  lqf, _ = finetune_experiment.settings(config)
  lqf = dataclasses.replace(lqf, fit=methods.get("lqf_steps").fit_options(lqf))  # the 40-step fit's update
  source = common.ensure_source(config.pretrain, args.source or os.path.join(tempfile.mkdtemp(), "source"))
  steps, decay = lqf.fit.steps, lqf.fit.weight_decay
  print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} "
        f"{jax.default_backend()}; {TARGET}, {args.seeds} seeds, {steps} full-batch K-FAC steps per fit")
  print("| shots | way | compile + run s | run s | run CPU s | max abs Δδ |")
  print("|---|---|---|---|---|---|")
  for shots in map(int, args.shots.split(",")):
    cells = [cell(source, config.targets[TARGET], lqf, shots, seed) for seed in range(args.seeds)]
    update = functools.partial(fit_lib._full_batch_update, tx=cells[0]["tx"], loss=lqf.fit.loss)  # pylint: disable=protected-access

    def one_by_one():
      out = []
      for c in cells:
        state = jax.tree.map(jnp.copy, c["state"])
        for _ in range(steps):
          state, _ = fit_lib.full_batch_step(state, None, *c["args"], decay, tx=c["tx"], loss=lqf.fit.loss)
        out.append(state.state.delta)
      return out

    stack = lambda *trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)  # noqa: E731
    states, stacked = stack(*(c["state"].state for c in cells)), stack(*(c["args"] for c in cells))
    batched = jax.jit(jax.vmap(lambda s, f0, jvp, t: update(s, None, f0, jvp, t, decay, step=0)[0]))

    def vmap_seeds():
      state = states
      for _ in range(steps):
        state = batched(state, *stacked)
      return [jax.tree.map(lambda a, i=i: a[i], state.delta) for i in range(len(cells))]

    @jax.jit
    def scanned(state, f0, jvp, targets):
      body = lambda s, _: (update(s, None, f0, jvp, targets, decay, step=0)[0], None)  # noqa: E731
      return jax.lax.scan(body, state, None, length=steps)[0].delta

    def scan_steps():
      return [scanned(c["state"].state, *c["args"]) for c in cells]

    ways = {"one by one": one_by_one, "vmap seeds": vmap_seeds}
    if str(shots) in args.scan_shots.split(","):
      ways["scan steps"] = scan_steps
    reference = None
    for name, fn in ways.items():
      first, _, _ = timed(fn)
      wall, cpu, deltas = timed(fn)
      reference = reference or deltas
      deviation = max(float(jnp.max(jnp.abs(a - b))) for d, r in zip(deltas, reference)
                      for a, b in zip(jax.tree.leaves(d), jax.tree.leaves(r)))
      print(f"| {shots} | {name} | {first:.2f} | {wall:.2f} | {cpu:.2f} | {deviation:.1e} |")


if __name__ == "__main__":
  main()
