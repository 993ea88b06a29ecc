"""Fine-tuning pieces: the ridge head, minibatching, nonlinear fine-tuning, the comparison tables."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.linear_model import Ridge

from experiments import compare
from lqf import fit as fit_lib
from lqf import heads, methods
from lqf.models import ResNet8
from lqf.nonlinear import finetune_nonlinear
from lqf.runtime import task as task_lib


def test_ridge_head_equals_sklearn():
  rng = np.random.default_rng(0)
  emb, labels = rng.normal(size=(40, 6)), rng.integers(0, 3, 40)
  kernel, bias = heads.ridge_head(emb, labels, 3, target_scale=15.0, penalty=0.5)
  ref = Ridge(alpha=0.5 * 40).fit(emb, 15.0 * np.eye(3)[labels])
  np.testing.assert_allclose(kernel, ref.coef_.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(bias, ref.intercept_, rtol=1e-5, atol=1e-5)


def test_unknown_head_init_names_the_field():
  with pytest.raises(ValueError, match="config.lqf.head_init='xavier'"):
    heads.init_head("xavier", np.zeros((2, 3)), np.zeros(2, int), 2, target_scale=1., penalty=1., seed=0)


def test_head_only_nonlinear_finetuning_is_adam_on_logistic_regression():
  """Fine-tuning only the head of the real network = Adam on multinomial logistic regression of the
  frozen embeddings, written independently with optax on (W, b)."""
  model = ResNet8(num_classes=3, width=4)
  x = jax.random.normal(jax.random.key(0), (12, 28, 28, 1))
  y = np.arange(12) % 3
  variables = model.init(jax.random.key(1), x)
  new = finetune_nonlinear(model, variables, np.asarray(x), y, trainable="^head/", seed=0,
                          settings=methods.NonlinearSettings(steps=5, learning_rate=0.05, batch_size=64))
  emb = task_lib.embed(model, variables, x)
  w = {"kernel": variables["params"]["head"]["kernel"], "bias": variables["params"]["head"]["bias"]}
  tx = optax.adamw(0.05, weight_decay=0.0)
  state = tx.init(w)
  loss = lambda w: optax.softmax_cross_entropy_with_integer_labels(
      emb @ w["kernel"] + w["bias"], jnp.asarray(y)).mean()
  for _ in range(5):
    updates, state = tx.update(jax.grad(loss)(w), state, w)
    w = optax.apply_updates(w, updates)
  np.testing.assert_allclose(new["params"]["head"]["kernel"], w["kernel"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(new["params"]["stage3"]["block1"]["conv1"]["kernel"],
                             variables["params"]["stage3"]["block1"]["conv1"]["kernel"])


def test_bfloat16_nonlinear_finetuning_rounds_the_compute_not_the_state():
  """``dtype='bfloat16'``: the tail's convolutions and head take bfloat16 operands, the returned
  parameters are float32, and after one Adam step the head moves like the float32 run's to bfloat16's
  rounding (Adam's first step is lr·sign(g), so only gradients that change sign can differ)."""
  model = ResNet8(num_classes=3, width=4)
  x = jax.random.normal(jax.random.key(0), (12, 12, 12, 1))
  y = np.arange(12) % 3
  variables = model.init(jax.random.key(1), x)
  tuned = {dtype: finetune_nonlinear(
      model, variables, np.asarray(x), y, trainable="^(stage3|head)/", seed=0,
      settings=methods.NonlinearSettings(steps=1, learning_rate=0.01, dtype=dtype)) for dtype in ("float32", "bfloat16")}
  half = model.clone(dtype=jnp.bfloat16)
  jaxpr = jax.make_jaxpr(lambda v, x: half.apply(v, x, start="stage3/block1"))(
      variables, model.apply(variables, x, stop="stage3/block1"))
  ops = [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ("conv_general_dilated", "dot_general")]
  assert ops and all(v.aval.dtype == jnp.bfloat16 for e in ops for v in e.invars)
  leaves = {d: jax.tree.leaves(t["params"]["head"]) for d, t in tuned.items()}
  assert all(leaf.dtype == jnp.float32 for leaf in leaves["bfloat16"])
  moved = [np.mean(np.isclose(a - w, b - w, rtol=0, atol=1e-6)) for a, b, w in
           zip(leaves["float32"], leaves["bfloat16"], jax.tree.leaves(variables["params"]["head"]))]
  assert min(moved) > 0.9
  with pytest.raises(ValueError, match="dtype='float16' is unknown"):
    methods.NonlinearSettings(dtype="float16")


def test_a_method_added_with_one_register_line_runs_like_the_built_in_ones(monkeypatch):
  """A new fine-tuning method is one `lqf.methods.register` call: 'head_gd' fits the head alone by
  exact-step gradient descent, no preconditioner. Run by `run_method` like the built-in methods, it reaches
  the ridge optimum of the head, recomputed with numpy: W = (XᵀX/N + λI)⁻¹(XᵀT/N + λW0), X = [e, 1]."""
  monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))
  methods.register(methods.Method("head_gd", trains=lambda trainable: methods.HEAD, fit=lambda settings:
                                  dataclasses.replace(settings.fit, preconditioner="none", steps=60)))
  model = ResNet8(num_classes=3, width=4)
  images = np.asarray(jax.random.normal(jax.random.key(0), (30, 28, 28, 1)))
  labels = np.arange(30) % 3
  variables = model.init(jax.random.key(1), images[:1])
  train, test = (images[:12], labels[:12]), (images[12:], labels[12:])
  settings = methods.LQFSettings(fit=fit_lib.FitOptions(weight_decay=0.1), target_scale=5.0)
  metrics = task_lib.run_method("head_gd", task_lib.Task(model, variables, train, test), settings,
                                methods.NonlinearSettings(), seed=0)
  ones = lambda x: np.concatenate([np.asarray(task_lib.embed(model, variables, x), np.float64),
                                   np.ones((len(x), 1))], axis=1)
  x, xt = ones(train[0]), ones(test[0])
  head = variables["params"]["head"]
  w0 = np.concatenate([head["kernel"], head["bias"][None]], axis=0).astype(np.float64)
  lam, n, t = 0.1, 12, 5.0 * np.eye(3)[train[1]]
  w = np.linalg.solve(x.T @ x / n + lam * np.eye(x.shape[1]), x.T @ t / n + lam * w0)
  loss = 0.5 * np.sum((x @ w - t) ** 2) / n + 0.5 * lam * np.sum((w - w0) ** 2)
  assert metrics["train_loss"] == pytest.approx(loss, rel=1e-4)
  assert metrics["accuracy"] == pytest.approx(np.mean((xt @ w).argmax(1) == test[1]), abs=1.5 / 18)
  with pytest.raises(ValueError, match="method 'head_gd' is already registered"):
    methods.register(methods.Method("head_gd"))


def test_summary_and_markdown_table():
  rows = [dict(target="t", shots=s, method=m, seed=k, accuracy=a)
          for s, m, k, a in [(1, "lqf", 0, 0.5), (1, "lqf", 1, 0.7), (0, "lqf", 0, 0.9),
                             (1, "nonlinear", 0, 0.4)]]
  summary = compare.summarize(rows)
  stat = summary["t"]["lqf"][1]
  # mean and sample std (ddof = 1): 0.6 ± sqrt(((0.5 − 0.6)² + (0.7 − 0.6)²) / 1); the 95 % interval
  # 0.6 ± t_{0.975, 1}·0.1414/√2 with t_{0.975, 1} = 12.7062 (a printed t table): ±1.2706.
  assert stat["mean"] == pytest.approx(0.6) and stat["std"] == pytest.approx(np.sqrt(0.02))
  assert (stat["low"], stat["high"]) == pytest.approx((0.6 - 1.270620, 0.6 + 1.270620), abs=1e-6)
  table = compare.markdown_tables(summary, [1, 0], ["lqf", "nonlinear"],
                                  compare.paired_differences(rows))
  assert "| lqf | 60.0 [-67.1, 187.1] | 90.0 [−∞, ∞] |" in table
  assert "| nonlinear | 40.0 [−∞, ∞] | – |" in table
  assert "| nonlinear − lqf | -10.0 [−∞, ∞] | – |" in table  # seed 0 only: 0.4 − 0.5
