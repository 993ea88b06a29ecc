r"""LQF benchmark on the demo problem: step costs and convergence, measured side by side in one run.

  python bench/bench_lqf.py --checkpoint /tmp/pretrain_mnist     # weights of configs/pretrain_mnist.py
  python bench/bench_lqf.py                                       # random-init weights (timing only)

Demo problem: ResNet-8 (leaky ReLU, 5 classes) on 28×28×1 images, 125 training images (25 shots of the
`mnist5k` digits 5–9, `lqf.data`), the new head ridge-fitted on the pretrained embeddings
(`lqf.heads.ridge_head`), the last stage + head linearized (58,053 parameters), full batch,
λ = 1e-3, s = 15. Measured:

* step time ratios (median of ``--repeats`` interleaved rounds, after compilation): the LQF step (cached
  trunk, linearized tail) vs a nonlinear step of the same trainable parameters (full forward from the
  images each step), both with the same Adam update and MSE loss, BatchNorm in inference mode; the same
  with every parameter trainable; the K-FAC LQF step vs the Adam LQF step;
* steps and wall-clock to 99 % of the optimal objective decrease (L* from CG to 1e-6) for K-FAC LQF
  (exact step size and momentum) vs Adam and SGD+momentum, each at its best learning rate of a grid;
  K-FAC's wall-clock includes computing its factors;
* CG iterations to relative residual 1e-4: the kernel form (`lqf.solve`, default for few examples),
  parameter-space CG with the K-FAC preconditioner, and plain CG.

Prints a table; ``--json PATH`` also writes the numbers.
"""

from __future__ import annotations

import functools
import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags

from lqf import checkpoint, data, fit, heads, kfac, loop, losses, solve
from lqf import linearize as lin_lib
from lqf.models import ResNet8

flags.DEFINE_string("checkpoint", None, "Pretraining workdir (orbax) of a ResNet-8 on 28×28×1 digits; "
                    "random-init weights if unset (fine for timing, not for convergence claims).")
flags.DEFINE_float("head_ridge", 1.0, "Ridge penalty α/N of the new head (lqf.heads.ridge_head).")
flags.DEFINE_integer("repeats", 5, "Interleaved timing rounds (the median is reported).")
flags.DEFINE_integer("max_steps", 2500, "Step cap for Adam and SGD+momentum (a learning rate's run also "
                     "stops once it cannot beat the best one so far).")
flags.DEFINE_list("adam_lrs", ["1e-3", "3e-3", "1e-2"], "Adam learning rates tried.")
flags.DEFINE_list("sgd_lrs", ["0.25", "0.5", "1.0"], "SGD (momentum 0.9) learning rates tried, in units "
                  "of the heavy-ball stability limit 2(1 + 0.9)/λ_max(H) (λ_max by power iteration).")
flags.DEFINE_string("json", None, "Also write the results to this JSON file.")
FLAGS = flags.FLAGS

TAIL, LAM, SCALE, NUM_CLASSES = "^(stage3|head)/", 1e-3, 15.0, 5


def demo_problem(checkpoint_dir: str | None, head_ridge: float):
  """(model, w0 with a ridge head, images (125, 28, 28, 1), labels (125,), description)."""
  config = ml_collections.ConfigDict(dict(name="mnist5k", image_size=28, classes=(5, 6, 7, 8, 9),
                                          shots=25, shot_seed=0, augment=False, data_dir=None,
                                          train_split="train", test_split="test"))
  images, labels = data.load_arrays(config, "train")
  model = ResNet8(num_classes=NUM_CLASSES, activation="leaky_relu")
  if checkpoint_dir:
    variables, _ = checkpoint.load_pretrained(checkpoint_dir)
    source = f"pretrained weights from {checkpoint_dir}"
  else:
    variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    source = "RANDOM-INIT weights (timing only; pass --checkpoint for convergence numbers)"
  emb = model.apply(variables, jnp.asarray(images), stop="head").mean(axis=(1, 2))
  kernel, bias = heads.ridge_head(np.asarray(emb), labels, NUM_CLASSES, target_scale=SCALE,
                                  penalty=head_ridge)
  params = {**variables["params"], "head": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}}
  return model, {"params": params, "batch_stats": variables["batch_stats"]}, jnp.asarray(images), \
      jnp.asarray(labels), source


@functools.partial(jax.jit, static_argnames=("lin", "tx"), donate_argnums=(0, 1))
def nonlinear_step(train, opt_state, variables, images, labels, *, lin, tx):
  """Nonlinear fine-tuning step of the same trainable parameters: full forward from the images."""
  def loss_fn(t):
    logits = lin.model.apply({**variables, "params": lin_lib.replace(variables["params"], t)}, images)
    w0 = lin_lib.select(variables["params"], lin.trainable)
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


def stateful(step, state):
  """Wraps ``state -> (state, ...)`` as a zero-argument callable that threads its (donated) state."""
  box = [state]

  def call():
    box[0], *rest = step(box[0])
    return rest
  return call


def lqf_stepper(lin, variables, labels, f0, jvp, tx):
  """The fitting step of `lqf.fit` on the whole (linearized once) training set (returns the loss)."""
  state = loop.init(fit.FitState(lin.init_delta(variables), tx.init(lin.init_delta(variables))))
  targets = losses.one_hot_targets(labels, NUM_CLASSES, SCALE)

  def step(s):
    s, metrics = fit.full_batch_step(s, None, f0, jvp, targets, LAM, tx=tx, loss="mse")
    return s, metrics["loss"]
  return stateful(step, state)


def nonlinear_stepper(lin, variables, images, labels, tx):
  train = jax.tree.map(jnp.copy, lin_lib.select(variables["params"], lin.trainable))

  def step(state):
    train, opt_state, value = nonlinear_step(*state, variables, images, labels, lin=lin, tx=tx)
    return (train, opt_state), value
  return stateful(step, (train, tx.init(train)))


def step_ratios(model, variables, images, labels, repeats):
  """Per-step seconds of the LQF / nonlinear steps (tail and all parameters) and K-FAC / Adam."""
  adam = optax.adam(1e-3)
  out = {}
  for name, trainable in (("tail", TAIL), ("all", "all")):
    lin = lin_lib.linearize(model, variables, trainable)
    features = lin.features(variables, images)
    f0, jvp = lin_lib.jit_tangent(lin, variables, features.h)
    steps = {f"lqf_{name}": lqf_stepper(lin, variables, labels, f0, jvp, optax.chain(adam)),
             f"nonlinear_{name}": nonlinear_stepper(lin, variables, images, labels, adam)}
    if name == "tail":
      tx = kfac_optimizer(lin, variables, features)
      steps["kfac_tail"] = lqf_stepper(lin, variables, labels, f0, jvp, tx)
    out.update(interleaved_times(steps, repeats))
  return out


def kfac_optimizer(lin, variables, features, factors=None):
  """K-FAC with the exact quadratic step (`lqf.fit.make_optimizer`), factors computed once at w0."""
  if factors is None:
    factors = kfac.curvature_factors(lin.tail, variables, features.h, lin.trainable)
  like = (jax.ShapeDtypeStruct(features.f0.shape, jnp.float32), lin.init_delta(variables))
  return fit.make_optimizer(fit.FitOptions(weight_decay=LAM), factors=factors, sqrt_curvature_like=like)


def run_to_target(lin, variables, labels, f0, jvp, tx, target, start, max_steps, check_every=25):
  """Steps until L(δ_k) − L* ≤ 1 % of L(0) − L*, via `fit.full_batch_step`; None if not reached."""
  step = lqf_stepper(lin, variables, labels, f0, jvp, tx)
  values = []
  for k in range(max_steps):
    values.append(step()[0])
    if (k + 1) % check_every == 0 or k + 1 == max_steps:
      history = np.asarray(jnp.stack(values))
      reached = np.nonzero(start - history >= 0.99 * (start - target))[0]
      if len(reached):
        return int(reached[0])  # δ_k with k = index: the objective before step k + 1
      if not np.all(np.isfinite(history)) or history[-1] > 10 * start:
        return None
  return None


def largest_curvature(matvec, like, iterations=30):
  """λ_max(H) by power iteration."""
  v = jax.tree.map(lambda a: jnp.ones_like(a) / np.sqrt(a.size), like)
  for _ in range(iterations):
    hv = matvec(v)
    norm = optax.tree_utils.tree_norm(hv)
    v = optax.tree_utils.tree_scale(1.0 / norm, hv)
  return float(norm)


def convergence(model, variables, images, labels, max_steps, adam_lrs, sgd_lrs, step_seconds):
  lin = lin_lib.linearize(model, variables, TAIL)
  features = lin.features(variables, images)
  f0, jvp = lin_lib.jit_tangent(lin, variables, features.h)
  targets = losses.one_hot_targets(labels, NUM_CLASSES, SCALE)
  objective = lambda d: float(fit.objective(d, f0, jvp, targets, loss="mse", weight_decay=LAM))  # noqa: E731
  optimum, info = solve.solve_linearized(lin, variables, features, targets, weight_decay=LAM, tol=1e-6,
                                         maxiter=1000)
  target, start = objective(optimum), objective(lin.init_delta(variables))
  matvec, _ = solve.normal_equations(lin, variables, features, targets, weight_decay=LAM)
  sgd_unit = 2 * 1.9 / largest_curvature(matvec, optimum)
  start_time = time.perf_counter()
  factors = jax.block_until_ready(kfac.curvature_factors(lin.tail, variables, features.h,
                                                         lin.trainable))
  factor_seconds = time.perf_counter() - start_time
  results = {"optimum_cg_iterations": info.iterations, "optimum_residual": info.relative_residual,
             "L0": start, "Lstar": target, "kfac_factor_seconds": factor_seconds}
  tx = kfac_optimizer(lin, variables, features, factors)
  k = run_to_target(lin, variables, labels, f0, jvp, tx, target, start, 200, check_every=5)
  results["kfac"] = {"steps": k, "seconds": None if k is None else
                     k * step_seconds["kfac_tail"] + factor_seconds}
  for name, lrs in (("adam", [float(lr) for lr in adam_lrs]),
                    ("sgd", [float(lr) * sgd_unit for lr in sgd_lrs])):
    best = None
    for lr in lrs:
      tx = optax.chain(optax.adam(lr) if name == "adam" else optax.sgd(lr, 0.9))
      cap = max_steps if best is None else best[0]
      k = run_to_target(lin, variables, labels, f0, jvp, tx, target, start, cap)
      if k is not None and (best is None or k < best[0]):
        best = (k, lr)
    results[name] = {"steps": None if best is None else best[0], "lr": None if best is None else best[1],
                     "seconds": None if best is None else best[0] * step_seconds["lqf_tail"]}
  for name, kwargs in (("kernel", dict(method="kernel")),
                       ("kfac", dict(method="parameter", factors=factors)),
                       ("plain", dict(method="parameter"))):
    start_time = time.perf_counter()
    _, info = solve.solve_linearized(lin, variables, features, targets, weight_decay=LAM, tol=1e-4,
                                     maxiter=400, **kwargs)
    results[f"cg_{name}"] = {"iterations": info.iterations, "residual": info.relative_residual,
                             "seconds": time.perf_counter() - start_time}
  return results


def main(argv):
  del argv
  model, variables, images, labels, source = demo_problem(FLAGS.checkpoint, FLAGS.head_ridge)
  lin = lin_lib.linearize(model, variables, TAIL)
  num = sum(x.size for x in jax.tree.leaves(lin.init_delta(variables)))
  print(f"demo: ResNet-8 leaky, {len(labels)} images 28x28x1, {source}; trainable {TAIL} = {num:,} params; "
        f"λ={LAM}, s={SCALE}, {jax.devices()[0].platform}")
  t = step_ratios(model, variables, images, labels, FLAGS.repeats)
  c = convergence(model, variables, images, labels, FLAGS.max_steps, FLAGS.adam_lrs, FLAGS.sgd_lrs, t)
  ms = lambda s: f"{1e3 * s:8.1f} ms"  # noqa: E731
  rows = [
      ("LQF step (cached trunk, tail) / nonlinear step", t["lqf_tail"] / t["nonlinear_tail"], "≤ 1.0",
       f"{ms(t['lqf_tail'])} vs {ms(t['nonlinear_tail'])}"),
      ("LQF step, all params / nonlinear step, all", t["lqf_all"] / t["nonlinear_all"], "≤ 1.6",
       f"{ms(t['lqf_all'])} vs {ms(t['nonlinear_all'])}"),
      ("K-FAC LQF step / Adam LQF step", t["kfac_tail"] / t["lqf_tail"], "≤ 1.5",
       f"{ms(t['kfac_tail'])} vs {ms(t['lqf_tail'])}"),
  ]
  print(f"\n{'step cost':52s} {'ratio':>7s} {'target':>7s}   times")
  for name, ratio, target, detail in rows:
    print(f"{name:52s} {ratio:7.2f} {target:>7s}   {detail}")
  print(f"\nto 99 % of the optimal decrease (L0 = {c['L0']:.4g}, L* = {c['Lstar']:.4g}, "
        f"CG residual {c['optimum_residual']:.1e} in {c['optimum_cg_iterations']} iterations)")
  print(f"{'method':28s} {'steps':>7s} {'wall-clock':>11s}   notes")
  fmt = lambda r: (f"{r['steps']:7d} {r['seconds']:10.2f}s" if r["steps"] is not None  # noqa: E731
                   else f"{'>max':>7s} {'-':>11s}")
  print(f"{'K-FAC LQF (exact α, β)':28s} {fmt(c['kfac'])}   incl. {c['kfac_factor_seconds']:.2f}s factors; "
        f"target ≤ 40 steps")
  for name in ("adam", "sgd"):
    label = "Adam" if name == "adam" else "SGD + momentum 0.9"
    print(f"{label:28s} {fmt(c[name])}   best lr {c[name]['lr']}")
  if c["kfac"]["steps"] is not None and c["adam"]["steps"] is not None:
    print(f"K-FAC vs tuned Adam wall-clock: {c['adam']['seconds'] / c['kfac']['seconds']:.1f}x faster "
          f"(target ≥ 10x)")
  print("\nCG to relative residual ‖b − Hδ‖/‖b‖ ≤ 1e-4 (target ≤ 50 iterations)")
  for name, label in (("kernel", "kernel form, NTK-approx. precond."), ("kfac", "parameter space, K-FAC"),
                      ("plain", "parameter space, plain")):
    r = c[f"cg_{name}"]
    print(f"{label:36s} {r['iterations']:5d} iterations  residual {r['residual']:.1e}  {r['seconds']:6.2f}s")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump({"source": source, "step_seconds": t, "convergence": c}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
