"""The streaming fine-tuning path on (mocked) CIFAR-10: trunk in the step, streamed K-FAC and evaluation.

A ResNet-8 of width 4 on 8×8 images of `tfds.testing.mock_data` CIFAR-10 (40 train, 40 test records).
The streamed pieces are checked against the in-memory ones: δ against a loop written here over the same
grain batches, the K-FAC factors against `curvature_factors` on the cached features, the test accuracy
against the cached evaluation; resume of a streamed (augmented) fit is exact; the entry point runs
`configs/finetune_r50.py:dataset=cifar10,source=orbax` end to end on a tiny orbax source written here.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from lqf.runtime import checkpoint as ckpt_lib
from experiments import finetune as finetune_experiment
from lqf import data as data_lib
from lqf import fit as fit_lib
from lqf import kfac
from lqf import linearize as lin_lib
from lqf.models import ResNet8
from lqf.runtime import config_util
from lqf.runtime import memory
from lqf.runtime import task as task_lib
from support import ROOT, CrashAtCheckpoint, DiesAfter, pretrain_env
TAIL, LAM, SCALE, BATCH, RECORDS = "^(stage3|head)/", 1e-2, 15.0, 8, 40


@pytest.fixture(scope="module")
def mocked():
  with tfds.testing.mock_data(num_examples=RECORDS):
    yield


def data_config(augment=False):
  return config_util.data_config("cifar10", image_size=8, augment=augment)


def random_variables(model, seed=1):
  """Variables of ``model`` for 8×8×3 images drawn with numpy (compiling ``model.init`` takes ~15 s
  on a loaded 2-core CPU): LeCun-normal kernels, BatchNorm statistics and affine maps near identity."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == "kernel":
      return rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
    if name == "var":
      return rng.uniform(0.5, 1.5, shape)
    return (name == "scale") + 0.1 * rng.normal(size=shape)
  return jax.tree.map(jnp.float32, jax.tree_util.tree_map_with_path(draw, shapes))


@pytest.fixture(scope="module")
def problem(mocked):
  data = data_config()
  model = ResNet8(num_classes=10, width=4)
  variables = random_variables(model)
  lin = lin_lib.linearize(model, variables, TAIL)
  sources = {split: data_lib.get_source(data, split) for split in ("train", "test")}
  return model, variables, lin, data, sources


def stream(source, data, seed=3):
  return fit_lib.ImageStream(data_lib.train_iterator(source, data, global_batch_size=BATCH, seed=seed,
                                                     process_index=0, process_count=1), BATCH, 10, SCALE)


def test_streamed_kfac_factors_equal_the_cached_ones(problem):
  _, variables, lin, data, sources = problem
  x, _ = data_lib.load_arrays(data, "train")
  h = lin.trunk_features(variables, x)
  batches = data_lib.eval_batches(sources["train"], data, batch_size=BATCH)
  streamed = kfac.stream_factors(lin, variables, batches, batch_size=BATCH, max_examples=21)
  cached = kfac.curvature_factors(lin.tail, variables, h[:21], lin.trainable_paths, batch_size=BATCH)
  for a, b in zip(jax.tree.leaves(streamed), jax.tree.leaves(cached), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7 * np.abs(b).max())


@pytest.mark.parametrize("learning_rate", [0.05, "auto"])
def test_streamed_fit_equals_a_loop_over_the_same_batches(problem, learning_rate):
  """fit_linearized on an ImageStream = K-FAC + SGD with momentum on the MSE of f_lin, written here with
  `Linearized.apply` (jax.jvp) and optax over the batches of a second iterator with the same seed (with
  'auto' at the rate the fit chose, its first batch read ahead for λmax and still the first step's)."""
  _, variables, lin, data, sources = problem
  factors = kfac.stream_factors(lin, variables, data_lib.eval_batches(sources["train"], data,
                                                                        batch_size=BATCH))
  options = fit_lib.FitOptions(optimizer="sgd", learning_rate=learning_rate, momentum=0.9,
                               weight_decay=LAM, steps=7)
  delta, history = fit_lib.fit_linearized(lin, variables, stream(sources["train"], data), None, options,
                                          curvature=factors)
  tx = optax.chain(kfac.kfac_precondition(factors, LAM), optax.sgd(history["learning_rate"], 0.9))

  @jax.jit
  def value_and_grad(d, images, labels):
    h = lin.trunk(variables, images)
    objective = lambda d: (
        0.5 * jnp.mean(jnp.sum((lin.apply(d, variables, h) - SCALE * jax.nn.one_hot(labels, 10)) ** 2, -1))
        + 0.5 * LAM * optax.tree_utils.tree_norm(d, squared=True))
    return jax.value_and_grad(objective)(d)

  ref = lin.init_delta(variables)
  state = tx.init(ref)
  losses = []
  for _, batch in zip(range(7), stream(sources["train"], data).iterator):  # 40 // 8 = 5 per epoch
    value, grad = value_and_grad(ref, batch["image"], batch["label"])
    updates, state = tx.update(grad, state, ref)
    ref = optax.apply_updates(ref, updates)
    losses.append(value)
  np.testing.assert_allclose(history["loss"], losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(delta), jax.tree.leaves(ref), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
  assert max(np.abs(a).max() for a in jax.tree.leaves(delta)) > 1e-3  # it moved


def test_streamed_test_accuracy_equals_the_cached_evaluation(problem):
  _, variables, lin, data, sources = problem
  delta = jax.tree.map(lambda w: 0.3 * jax.random.normal(jax.random.key(7), w.shape),
                       lin.init_delta(variables))
  task = task_lib.Task(problem[0], variables, sources["train"], sources["test"], data=data)
  logits, labels = task.test_logits(task_lib._linearized_logits, (lin, delta, variables))
  streamed = np.mean(logits.argmax(-1) == labels)
  xt, yt = data_lib.load_arrays(data, "test")
  features = lin.features(variables, xt)
  cached = fit_lib.evaluate(lin, variables, delta, features, jnp.asarray(yt))
  expected = np.mean(np.asarray(lin.apply(delta, variables, features.h)).argmax(-1) == yt)
  assert streamed == expected and cached == pytest.approx(expected, abs=1e-7)  # evaluate: float32 mean


def run_config(method, **lqf):
  config = config_util.load_sibling(os.path.join(ROOT, "configs", "x.py"), "finetune_r50",
                                    f"dataset=cifar10,source=orbax,method={method}")
  config.data.image_size = 8
  config.lqf.update({**dict(trainable=TAIL, batch_size=BATCH, steps=6, curvature_batch_size=BATCH,
                            kfac_examples=16, learning_rate=0.05, weight_decay=LAM), **lqf})
  config.nonlinear.update(dict(batch_size=BATCH, steps=6))
  return config


@pytest.mark.parametrize("method, learning_rate", [("lqf", 0.05), ("lqf", "auto"), ("nonlinear", 0.05)])
def test_interrupted_streamed_fit_resumes_exactly(problem, tmp_path, method, learning_rate):
  """An augmented streamed fit killed after step 4 and rerun (fresh iterator) = an uninterrupted one:
  the checkpoint holds the grain iterator's position, augmentation draws included; with
  learning_rate='auto' the first batch, read before the fit for λmax, is still the first step's."""
  model, variables, _, _, _ = problem
  config = run_config(method, learning_rate=learning_rate)
  data = data_config(augment=True)

  def fit(checkpoints):
    task = task_lib.Task(model, variables, *(data_lib.get_source(data, s) for s in ("train", "test")),
                         data=data)
    return task_lib.run_method(method, task, *finetune_experiment.settings(config), seed=1,
                               checkpoints=checkpoints)

  full = ckpt_lib.RunCheckpoints(str(tmp_path / "full"), save_every=2)
  expected = fit(full)
  full.close()
  with pytest.raises(CrashAtCheckpoint):
    fit(DiesAfter(str(tmp_path / "killed"), at=4, save_every=2))
  resumed = ckpt_lib.RunCheckpoints(str(tmp_path / "killed"), save_every=2)
  assert resumed.latest_step() == 4
  assert fit(resumed) == expected
  resumed.close()
  saved = [ocp.StandardCheckpointer().restore(tmp_path / w / "checkpoints" / "6" / "state")
           for w in ("full", "killed")]
  for a, b in zip(jax.tree.leaves(saved[0]), jax.tree.leaves(saved[1]), strict=True):
    np.testing.assert_array_equal(a, b)


def test_diverging_minibatch_steps_name_the_learning_rate(problem):
  model, variables, _, data, sources = problem
  task = task_lib.Task(model, variables, sources["train"], sources["test"], data=data)
  message = (r"^the loss or gradient is NaN or Inf at step \d: .*; the lqf objective diverged \(optimizer "
             r"'sgd'\): lower config\.lqf\.learning_rate \(now 1e\+30\)\.$")
  with pytest.raises(FloatingPointError, match=message):
    task_lib.run_method("lqf", task, *finetune_experiment.settings(run_config("lqf", learning_rate=1e30)),
                        seed=1)


def test_nystrom_on_a_streamed_training_set_is_a_one_line_error(problem):
  model, variables, _, data, sources = problem
  task = task_lib.Task(model, variables, sources["train"], sources["test"], data=data)
  with pytest.raises(ValueError, match=r"^config\.lqf\.preconditioner='nystrom' needs the training "
                                       r"features in memory .*: use 'kfac' for a streamed training set\.$"):
    task_lib.run_method("lqf", task, *finetune_experiment.settings(run_config("lqf", preconditioner="nystrom")),
                        seed=1)


_MOCKED_ENTRY = ("import sys, tensorflow_datasets as tfds; from lqf.runtime import cli\n"
                 "from experiments import finetune\n"
                 f"with tfds.testing.mock_data(num_examples={RECORDS}): cli.launch(finetune.run)")


def test_finetune_r50_config_end_to_end_on_a_tiny_orbax_source(problem, tmp_path):
  """`experiments/finetune.py`'s entry point (under mock data) with the CIFAR-10 config, streamed, from
  an orbax source laid out as `lqf.train` writes it (a ResNet-8 of width 4): result.json's accuracy =
  f_lin of the saved δ on the in-memory test set, with the head recomputed here."""
  source, workdir = str(tmp_path / "source"), str(tmp_path / "run")
  model_config = config_util.model_config("resnet8", width=4)
  checkpoints = ckpt_lib.RunCheckpoints(source)
  checkpoints.save(1, dict(problem[1]), meta={"config": {"model": model_config.to_dict()}}, force=True)
  checkpoints.close()
  flags = [f"--config={os.path.join(ROOT, 'configs', 'finetune_r50.py')}:dataset=cifar10,source=orbax",
           f"--config.pretrained.workdir={source}", "--config.data.image_size=8",
           f"--config.lqf.trainable={TAIL}", f"--config.lqf.batch_size={BATCH}", "--config.lqf.steps=3",
           "--config.lqf.kfac_examples=16", f"--config.lqf.curvature_batch_size={BATCH}",
           "--config.checkpoint_every=2", f"--workdir={workdir}"]
  run = subprocess.run([sys.executable, "-c", _MOCKED_ENTRY, *flags], env=pretrain_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  with open(os.path.join(workdir, "result.json")) as f:
    result = json.load(f)

  config = config_util.load_sibling(os.path.join(ROOT, "configs", "x.py"), "finetune_r50",
                                    "dataset=cifar10,source=orbax")
  variables = problem[1]
  x, y = data_lib.load_arrays(data_config(), "train")
  model, variables = task_lib.with_new_head(
      model_config, variables, task_lib.embed(ResNet8(num_classes=10, width=4), variables, x), y, 10,
      head_init=config.lqf.head_init, target_scale=config.lqf.target_scale,
      head_ridge=config.lqf.head_ridge, seed=0)
  lin = lin_lib.linearize(model, variables, TAIL)
  saved = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", "3", "state"))
  fit_state = saved["loop"]["state"]
  delta = fit_state[0] if isinstance(fit_state, (list, tuple)) else fit_state["delta"]
  xt, yt = data_lib.load_arrays(data_config(), "test")
  logits = lin.apply(delta, variables, lin.trunk(variables, jnp.asarray(xt)))
  assert result["accuracy"] == np.mean(np.argmax(logits, -1) == yt)
  assert result["shots"] is None and np.isfinite(result["train_loss"])


def test_missing_orbax_source_names_the_pretraining_command(tmp_path):
  config = config_util.load_sibling(os.path.join(ROOT, "configs", "x.py"), "finetune_r50",
                                    "dataset=cifar10,source=orbax")
  config.pretrained.workdir = str(tmp_path / "never")
  with pytest.raises(FileNotFoundError) as info:
    finetune_experiment.run(config, str(tmp_path / "out"))
  assert str(info.value) == (
      f"config.pretrained.workdir='{tmp_path / 'never'}' holds no pretrained checkpoint: run "
      f"`python -m experiments.pretrain --config configs/pretrain_imagenet.py --workdir "
      f"{tmp_path / 'never'}` first.")
  assert not os.path.exists(tmp_path / "out")


def test_full_batch_or_quadratic_steps_on_streamed_data_are_one_line_errors(problem):
  model, _, _, _, _ = problem
  config = run_config("lqf", batch_size=None)
  config.data = data_config(augment=True)
  with pytest.raises(ValueError, match=r"^config\.lqf\.batch_size=None \(full batch\) needs the training "
                                       r"features in memory, but they are streamed \(config\.data\.augment"
                                       r"=True\): set config\.lqf\.batch_size, e\.g\. 128\.$"):
    memory.cache_plan("lqf", finetune_experiment.settings(config)[0], config.data, model, 40, 40)
  config.data.augment = False
  assert memory.cache_plan("lqf", finetune_experiment.settings(config)[0], config.data, model, 40,
                             40) == (True, True)
  config.lqf.cache_gib = 7e-5  # 75 kB; 40 × 4·(8·8·3 + 4·4·8) bytes = 51 kB of train, 102 kB with test
  assert memory.cache_plan("lqf", finetune_experiment.settings(config)[0], config.data, model, 40,
                             40) == (True, False)
  with pytest.raises(ValueError, match=r"^config\.lqf\.optimizer='quadratic' needs the exact quadratic"):
    finetune_experiment.settings(run_config("lqf", optimizer="quadratic"))[0].fit
