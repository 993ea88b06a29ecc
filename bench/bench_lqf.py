r"""LQF benchmark on the demo problem: step costs, memory, convergence and the stable step, in one run.

  python bench/bench_lqf.py --checkpoint /tmp/pretrain_mnist --json /tmp/bench.json  # configs/pretrain_mnist.py
  python bench/bench_lqf.py                                       # random-init weights (timing only)

Demo problem: ResNet-8 (leaky ReLU, 5 classes) on 28×28×1 images, 125 training images (25 shots of the
`mnist5k` digits 5–9, `lqf.data`), the last stage + head linearized (58,053 parameters), full batch,
λ = 1e-3, s = 15; the new head ridge-fitted on the pretrained embeddings (`lqf.heads.ridge_head`) or
random (`lqf.heads.init_head`). Measured:

* step time ratios (median of ``--repeats`` interleaved rounds, after compilation): the LQF step (cached
  trunk, linearized tail) vs a nonlinear step of the same trainable parameters (full forward from the
  images each step), both with the same Adam update and MSE loss, BatchNorm in inference mode; the same
  with every parameter trainable; the Nyström and the K-FAC LQF steps (exact step size and momentum) vs
  the Adam LQF step;
* peak memory of those compiled steps (`jax.jit(...).lower(...).compile().memory_analysis()`: arguments +
  outputs − aliased + temporaries): the linearized step vs the nonlinear step, tail and all;
* per head: λmax(MH) by power iteration without preconditioner, with K-FAC and with the Nyström sketch;
  steps and wall-clock to 99 % of the optimal objective decrease (L* from CG to 1e-6) for the Nyström and
  K-FAC steps — wall-clock = the curvature's one-time cost (its second computation, after compilation)
  + steps × step time — and for Adam and SGD + momentum 0.9, each at its best learning rate of ``--lrs``
  (a best rate at an edge of the grid is flagged); CG iterations to relative residual 1e-4: the kernel
  form (`lqf.solve`'s default for few examples), parameter space with the Nyström sketch, with K-FAC and
  plain;
* the stable window of minibatch preconditioned SGD (momentum 0.9, batch 128) on all 2,000 training
  images of the target (ridge head): λmax(MH_B) on the first batch (what ``learning_rate='auto'``
  uses) and λmax(MH) on all, and the objective after ``--window_steps`` steps at fractions of
  η_max = 2(1 + β)/λmax(MH_B).

Prints tables; ``--json PATH`` also writes the numbers. Timings are wall-clock of this process; the
totals at the end add its CPU seconds.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import resource
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags

from lqf import data, fit, guard, heads, losses, solve, stability
from lqf import linearize as lin_lib
from lqf.models import ResNet8
from lqf.runtime import checkpoint, parallel

flags.DEFINE_string("checkpoint", None, "Pretraining workdir (orbax) of a ResNet-8 on 28×28×1 digits; "
                    "random-init weights if unset (fine for timing, not for convergence claims).")
flags.DEFINE_float("head_ridge", 1.0, "Ridge penalty α/N of the ridge head (lqf.heads.ridge_head).")
flags.DEFINE_integer("repeats", 5, "Interleaved timing rounds (the median is reported).")
flags.DEFINE_integer("max_steps", 2500, "Step cap for Adam and SGD+momentum (a learning rate's run also "
                     "stops once it cannot beat the best one so far).")
flags.DEFINE_list("lrs", ["1e-3", "3e-3", "3e-4", "1e-2", "1e-4", "3e-2", "1e-1"],
                  "Learning rates tried for Adam and for SGD + momentum 0.9 (in this order).")
flags.DEFINE_list("window_fractions", ["0.1", "0.2", "0.3", "0.5", "0.75", "1.0", "2.0"],
                  "Learning rates of the stable-window runs, in units of η_max = 2(1 + β)/λmax(MH_B).")
flags.DEFINE_integer("window_steps", 300, "Steps of each stable-window run.")
flags.DEFINE_string("json", None, "Also write the results to this JSON file.")
FLAGS = flags.FLAGS

TAIL, LAM, SCALE, NUM_CLASSES, RANK = "^(stage3|head)/", 1e-3, 15.0, 5, 128
PRECONDITIONERS = ("nystrom", "kfac")


def target_data(shots: int | None) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(name="mnist5k", image_size=28, classes=(5, 6, 7, 8, 9),
                                        shots=shots, shot_seed=0, augment=False, data_dir=None,
                                        train_split="train", test_split="test"))


def source_model(checkpoint_dir: str | None):
  """(model, pretrained variables, description)."""
  model = ResNet8(num_classes=NUM_CLASSES, activation="leaky_relu")
  if checkpoint_dir:
    variables, _ = checkpoint.load_pretrained(checkpoint_dir)
    return model, variables, f"pretrained weights from {checkpoint_dir}"
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  return model, variables, "RANDOM-INIT weights (timing only; pass --checkpoint for convergence numbers)"


def with_head(model, variables, images, labels, head: str, head_ridge: float) -> dict:
  """w0 with the new head ('ridge' or 'random', `lqf.heads.init_head`)."""
  emb = model.apply(variables, jnp.asarray(images), stop="head").mean(axis=(1, 2))
  new = heads.init_head(head, np.asarray(emb), labels, NUM_CLASSES, target_scale=SCALE, penalty=head_ridge,
                        seed=0)
  return {"params": {**variables["params"], "head": jax.tree.map(jnp.asarray, new)},
          "batch_stats": variables["batch_stats"]}


@functools.partial(jax.jit, static_argnames=("lin", "tx"), donate_argnums=(0, 1))
def nonlinear_step(train, opt_state, variables, images, labels, *, lin, tx):
  """Nonlinear fine-tuning step of the same trainable parameters: full forward from the images."""
  def loss_fn(t):
    logits = lin.model.apply({**variables, "params": lin_lib.replace(variables["params"], t)}, images)
    w0 = lin_lib.select(variables["params"], lin.trainable_paths)
    return (losses.weighted_squared_error(logits, losses.one_hot_targets(labels, NUM_CLASSES, SCALE))
            + losses.weight_decay(jax.tree.map(jnp.subtract, t, w0), LAM))
  value, grad = jax.value_and_grad(loss_fn)(train)
  updates, opt_state = tx.update(grad, opt_state, train)
  return optax.apply_updates(train, updates), opt_state, value


def interleaved_times(steps: dict, repeats: int, calls: int = 10) -> dict[str, float]:
  """Median seconds per call of each zero-argument step function, timed in interleaved rounds."""
  for step in steps.values():
    jax.block_until_ready(step())
  times = {name: [] for name in steps}
  for _ in range(repeats):
    for name, step in steps.items():
      start = time.perf_counter()
      for _ in range(calls):
        out = step()
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - start) / calls)
  return {name: float(np.median(t)) for name, t in times.items()}


class Stepper:
  """A jitted step with its (donated) state threaded through; ``memory()`` analyses its compilation."""

  def __init__(self, step, state, *args, **static):
    self.step, self.state, self.args, self.static = step, state, args, static

  def __call__(self):
    self.state, *rest = self.step(self.state, *self.args, **self.static)
    return rest

  def memory(self) -> dict[str, int]:
    """Bytes of the compiled step: arguments, outputs, aliased (donated), temporaries, and the peak
    estimate arguments + outputs − aliased + temporaries."""
    analysis = self.step.lower(self.state, *self.args, **self.static).compile().memory_analysis()
    out = {k: int(getattr(analysis, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def _lqf_step(state, f0, jvp, targets, *, tx):
  state, metrics = fit.full_batch_step(state, None, f0, jvp, targets, LAM, tx=tx, loss="mse")
  return state, metrics["loss"]


_lqf_step = jax.jit(_lqf_step, static_argnames="tx", donate_argnums=0)


def lqf_stepper(lin, variables, labels, f0, jvp, tx, quadratic=False) -> Stepper:
  """The fitting step of `lqf.fit` on the whole (linearized once) training set (returns the loss); an
  exact-step (``quadratic``) fit carries its residual S_J·δ as `lqf.fit.fit_linearized` does."""
  delta = lin.init_delta(variables)
  state = guard.init(fit.FitState(delta, tx.init(delta), jnp.zeros(f0.shape) if quadratic else None))
  return Stepper(_lqf_step, state, f0, jvp, losses.one_hot_targets(labels, NUM_CLASSES, SCALE), tx=tx)


def _nonlinear(state, variables, images, labels, *, lin, tx):
  train, opt_state, value = nonlinear_step(*state, variables, images, labels, lin=lin, tx=tx)
  return (train, opt_state), value


_nonlinear = jax.jit(_nonlinear, static_argnames=("lin", "tx"), donate_argnums=0)


def nonlinear_stepper(lin, variables, images, labels, tx) -> Stepper:
  train = jax.tree.map(jnp.copy, lin_lib.select(variables["params"], lin.trainable_paths))
  return Stepper(_nonlinear, (train, tx.init(train)), variables, images, labels, lin=lin, tx=tx)


def quadratic_optimizer(name, curvature, f0_shape, delta):
  """The exact-step optimizer of ``name`` ('nystrom', 'kfac', 'none') as `lqf.fit` builds it."""
  like = (jax.ShapeDtypeStruct(f0_shape, jnp.float32), delta)
  return fit.make_optimizer(fit.FitOptions(weight_decay=LAM, preconditioner=name), curvature=curvature,
                            sqrt_curvature_like=like)


def timed(compute):
  """(result, seconds of a second call): the one-time cost after compilation."""
  jax.block_until_ready(compute())
  start = time.perf_counter()
  result = jax.block_until_ready(compute())
  return result, time.perf_counter() - start


def curvatures(lin, variables, features):
  """{name: (curvature, seconds)} of the Nyström sketch and the K-FAC factors (`lqf.fit.curvature_of`)."""
  options = {name: fit.FitOptions(weight_decay=LAM, preconditioner=name, nystrom_rank=RANK)
             for name in PRECONDITIONERS}
  return {name: timed(lambda o=o: fit.curvature_of(o, lin, variables, features.h))
          for name, o in options.items()}


def steps_and_memory(model, variables, images, labels, repeats):
  """Per-step seconds and compiled memory of the LQF / nonlinear steps (tail and all) and the
  Nyström / K-FAC exact steps."""
  adam = optax.adam(1e-3)
  seconds, memory = {}, {}
  for name, trainable in (("tail", TAIL), ("all", "all")):
    lin = lin_lib.linearize(model, variables, trainable)
    features = lin.features(variables, images)
    f0, jvp = lin_lib.jit_tangent(lin, variables, features.h)
    steps = {f"lqf_{name}": lqf_stepper(lin, variables, labels, f0, jvp, optax.chain(adam)),
             f"nonlinear_{name}": nonlinear_stepper(lin, variables, images, labels, adam)}
    if name == "tail":
      for pre, (curvature, _) in curvatures(lin, variables, features).items():
        tx = quadratic_optimizer(pre, curvature, f0.shape, lin.init_delta(variables))
        steps[f"{pre}_tail"] = lqf_stepper(lin, variables, labels, f0, jvp, tx, quadratic=True)
    memory.update({k: s.memory() for k, s in steps.items() if not k.startswith(PRECONDITIONERS)})
    seconds.update(interleaved_times(steps, repeats))
  return seconds, memory


def run_to_target(stepper, target, start, max_steps, check_every=25):
  """Steps until L(δ_k) − L* ≤ 1 % of L(0) − L*; None if not reached within ``max_steps``."""
  values = []
  for k in range(max_steps):
    values.append(stepper()[0])
    if (k + 1) % check_every == 0 or k + 1 == max_steps:
      history = np.asarray(jnp.stack(values))
      reached = np.nonzero(start - history >= 0.99 * (start - target))[0]
      if len(reached):
        return int(reached[0])  # δ_k with k = index: the objective before step k + 1
      if not np.all(np.isfinite(history)) or history[-1] > 10 * start:
        return None
  return None


def convergence(model, variables, images, labels, *, max_steps, lrs, step_seconds):
  """λmax(MH), steps / wall-clock to 99 % and CG iterations for one head (module docstring)."""
  lin = lin_lib.linearize(model, variables, TAIL)
  features = lin.features(variables, images)
  f0, jvp = lin_lib.jit_tangent(lin, variables, features.h)
  targets = losses.one_hot_targets(labels, NUM_CLASSES, SCALE)
  objective = lambda d: float(fit.objective(d, f0, jvp, targets, loss="mse", weight_decay=LAM))  # noqa: E731
  delta = lin.init_delta(variables)
  optimum, info = solve.solve_linearized(lin, variables, features, targets, weight_decay=LAM, tol=1e-6,
                                         maxiter=1000)
  target, start = objective(optimum), objective(delta)
  out = {"optimum_cg_iterations": info.iterations, "optimum_residual": info.relative_residual,
         "L0": start, "Lstar": target}
  matvec, _ = solve.normal_equations(lin, variables, features, targets, weight_decay=LAM)
  out["lambda_max"] = {"none": stability.largest_eigenvalue(matvec, lambda v: v, delta, iterations=50)}
  curvature = curvatures(lin, variables, features)
  for name, (curv, seconds) in curvature.items():
    out["lambda_max"][name] = stability.largest_eigenvalue(matvec, solve.preconditioner(curv, LAM), delta,
                                                           iterations=50)
    tx = quadratic_optimizer(name, curv, f0.shape, delta)
    k = run_to_target(lqf_stepper(lin, variables, labels, f0, jvp, tx, quadratic=True), target, start, 400,
                      check_every=5)
    out[name] = {"steps": k, "curvature_seconds": seconds,
                 "seconds": None if k is None else seconds + k * step_seconds[f"{name}_tail"]}
  grid = [float(lr) for lr in lrs]
  for name in ("adam", "sgd"):
    best = None
    for lr in grid:
      tx = optax.chain(optax.adam(lr) if name == "adam" else optax.sgd(lr, 0.9))
      k = run_to_target(lqf_stepper(lin, variables, labels, f0, jvp, tx), target, start,
                        max_steps if best is None else best[0])
      if k is not None and (best is None or k < best[0]):
        best = (k, lr)
    out[name] = {"steps": None if best is None else best[0], "lr": None if best is None else best[1],
                 "grid_edge": best is not None and best[1] in (min(grid), max(grid)),
                 "seconds": None if best is None else best[0] * step_seconds["lqf_tail"]}
  for name, kwargs in (("kernel", dict(method="kernel")),
                       ("nystrom", dict(method="parameter", curvature=curvature["nystrom"][0])),
                       ("kfac", dict(method="parameter", curvature=curvature["kfac"][0])),
                       ("plain", dict(method="parameter"))):
    start_time = time.perf_counter()
    _, info = solve.solve_linearized(lin, variables, features, targets, weight_decay=LAM, tol=1e-4,
                                     maxiter=400, **kwargs)
    out[f"cg_{name}"] = {"iterations": info.iterations, "residual": info.relative_residual,
                         "seconds": time.perf_counter() - start_time}
  return out


def window(model, variables, head_ridge, fractions, steps):
  """The stable window of minibatch preconditioned SGD on all training images (module docstring)."""
  images, labels = data.load_arrays(target_data(None), "train")
  variables = with_head(model, variables, images, labels, "ridge", head_ridge)
  lin = lin_lib.linearize(model, variables, TAIL)
  features = lin.features(variables, images)
  targets = losses.one_hot_targets(jnp.asarray(labels), NUM_CLASSES, SCALE)
  n, batch = len(labels), 128

  def objective(d):
    f = fit.predict(lin, variables, d, features.h)
    return float(losses.weighted_squared_error(f, targets) + losses.weight_decay(d, LAM))

  out = {"examples": n, "batch_size": batch, "steps": steps, "L0": objective(lin.init_delta(variables))}
  first = next(fit.batch_order(n, batch, 0))
  for name in PRECONDITIONERS:
    options = fit.FitOptions(weight_decay=LAM, preconditioner=name, optimizer="sgd", momentum=0.9,
                             batch_size=batch, steps=steps, nystrom_rank=RANK)
    curvature = fit.curvature_of(options, lin, variables, features.h)
    precondition = solve.preconditioner(curvature, LAM)
    lam = {}
    for part, idx, chunk in (("first_batch", first, None), ("all", np.arange(n), batch)):
      matvec, _ = solve.normal_equations(lin, variables, lin_lib.Features(features.h[idx], features.f0[idx]),
                                         losses.one_hot_targets(jnp.asarray(labels[idx]), NUM_CLASSES, SCALE),
                                         weight_decay=LAM, batch_size=chunk)
      lam[part] = stability.largest_eigenvalue(matvec, precondition, lin.init_delta(variables))
    limit = stability.stability_limit(lam["first_batch"], 0.9)
    runs = {}
    for fraction in fractions:
      try:
        delta, _ = fit.fit_linearized(lin, variables, features, targets,
                                      dataclasses.replace(options, learning_rate=fraction * limit),
                                      curvature=curvature)
        runs[fraction] = objective(delta)
      except FloatingPointError:
        runs[fraction] = float("nan")
    out[name] = {"lambda_max": lam, "limit": limit, "objective": runs}
  return out


def report(source, num, seconds, memory, results, stable):
  print(f"demo: ResNet-8 leaky, 125 images 28x28x1, {source}; trainable {TAIL} = {num:,} params; "
        f"λ={LAM}, s={SCALE}, {jax.devices()[0].platform}")
  ms = lambda s: f"{1e3 * s:8.1f} ms"  # noqa: E731
  mib = lambda b: f"{b / 2 ** 20:7.1f} MiB"  # noqa: E731
  rows = [("LQF step (cached trunk, tail) / nonlinear step", "lqf_tail", "nonlinear_tail", "≤ 1.0"),
          ("LQF step, all params / nonlinear step, all", "lqf_all", "nonlinear_all", "≤ 1.6"),
          ("Nyström LQF step / Adam LQF step", "nystrom_tail", "lqf_tail", "≤ 1.5"),
          ("K-FAC LQF step / Adam LQF step", "kfac_tail", "lqf_tail", "≤ 1.5")]
  print(f"\n{'step cost':52s} {'ratio':>7s} {'target':>7s}   times")
  for name, a, b, target in rows:
    print(f"{name:52s} {seconds[a] / seconds[b]:7.2f} {target:>7s}   {ms(seconds[a])} vs {ms(seconds[b])}")
  print(f"\n{'peak memory of the compiled step':52s} {'ratio':>7s}   linearized vs nonlinear (temporaries)")
  for part in ("tail", "all"):
    lq, nl = memory[f"lqf_{part}"], memory[f"nonlinear_{part}"]
    print(f"{'linearized / nonlinear, ' + part:52s} {lq['peak'] / nl['peak']:7.2f}   {mib(lq['peak'])} vs "
          f"{mib(nl['peak'])} ({mib(lq['temp'])} vs {mib(nl['temp'])})")
  fmt = lambda r: (f"{r['steps']:7d} {r['seconds']:10.2f}s" if r["steps"] is not None  # noqa: E731
                   else f"{'>max':>7s} {'-':>11s}")
  for head, c in results.items():
    print(f"\n[{head} head] to 99 % of the optimal decrease (L0 = {c['L0']:.4g}, L* = {c['Lstar']:.4g}, "
          f"CG residual {c['optimum_residual']:.1e} in {c['optimum_cg_iterations']} iterations); "
          f"λmax(MH): none {c['lambda_max']['none']:.4g}, K-FAC {c['lambda_max']['kfac']:.4g}, "
          f"Nyström {c['lambda_max']['nystrom']:.4g}")
    print(f"{'method':28s} {'steps':>7s} {'wall-clock':>11s}   notes")
    for name, label in (("nystrom", f"Nyström rank {RANK} (exact α, β)"), ("kfac", "K-FAC (exact α, β)")):
      print(f"{label:28s} {fmt(c[name])}   incl. {c[name]['curvature_seconds']:.2f}s curvature; "
            "target ≤ 20 steps")
    for name, label in (("adam", "Adam"), ("sgd", "SGD + momentum 0.9")):
      edge = " (grid edge)" if c[name]["grid_edge"] else ""
      print(f"{label:28s} {fmt(c[name])}   best lr {c[name]['lr']}{edge}")
    for name in PRECONDITIONERS:
      if c[name]["steps"] is not None and c["adam"]["steps"] is not None:
        print(f"{name} vs tuned Adam wall-clock: {c['adam']['seconds'] / c[name]['seconds']:.1f}x faster "
              "(target ≥ 40x)")
    print("CG to relative residual ‖b − Hδ‖/‖b‖ ≤ 1e-4 (target ≤ 50 iterations)")
    for name, label in (("kernel", "kernel form, NTK-approx. precond."), ("nystrom", "parameter space, Nyström"),
                        ("kfac", "parameter space, K-FAC"), ("plain", "parameter space, plain")):
      r = c[f"cg_{name}"]
      print(f"  {label:36s} {r['iterations']:5d} iterations  residual {r['residual']:.1e}  "
            f"{r['seconds']:6.2f}s")
  print(f"\nstable window: minibatch SGD, momentum 0.9, batch {stable['batch_size']}, {stable['steps']} steps "
        f"on all {stable['examples']} training images (L0 = {stable['L0']:.4g}); objective at fractions of "
        "η_max = 2(1 + β)/λmax(MH_B), B the first batch")
  for name in PRECONDITIONERS:
    s = stable[name]
    runs = "  ".join(f"{f}: {v:.4g}" for f, v in s["objective"].items())
    print(f"  {name:8s} λmax(MH_B) {s['lambda_max']['first_batch']:.4g}, λmax(MH) {s['lambda_max']['all']:.4g}, "
          f"η_max {s['limit']:.3g}:  {runs}")


def main(argv):
  del argv
  parallel.single_threaded_blas()
  wall = time.perf_counter()
  model, source_variables, source = source_model(FLAGS.checkpoint)
  images, labels = data.load_arrays(target_data(25), "train")
  images, labels = jnp.asarray(images), jnp.asarray(labels)
  variables = with_head(model, source_variables, images, labels, "ridge", FLAGS.head_ridge)
  num = sum(x.size for x in jax.tree.leaves(lin_lib.linearize(model, variables, TAIL).init_delta(variables)))
  seconds, memory = steps_and_memory(model, variables, images, labels, FLAGS.repeats)
  results = {head: convergence(model, with_head(model, source_variables, images, labels, head, FLAGS.head_ridge),
                               images, labels, max_steps=FLAGS.max_steps, lrs=FLAGS.lrs, step_seconds=seconds)
             for head in ("ridge", "random")}
  stable = window(model, source_variables, FLAGS.head_ridge, [float(f) for f in FLAGS.window_fractions],
                  FLAGS.window_steps)
  report(source, num, seconds, memory, results, stable)
  usage = resource.getrusage(resource.RUSAGE_SELF)
  totals = {"wall_seconds": time.perf_counter() - wall, "cpu_seconds": usage.ru_utime + usage.ru_stime}
  print(f"\ntotal: {totals['wall_seconds']:.0f} s wall, {totals['cpu_seconds']:.0f} CPU-s")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump({"source": source, "step_seconds": seconds, "memory_bytes": memory, "convergence": results,
                 "stable_window": stable, "totals": totals}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
