"""Model family: torchvision parameter counts, shapes, split points, activations."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from lqf import models
from lqf.runtime import config_util


def _param_count(model, image_size):
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3))))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize("factory,expected", [
    (models.ResNet18, 11_689_512), (models.ResNet34, 21_797_672), (models.ResNet50, 25_557_032),
    (models.ResNet101, 44_549_160)])
def test_parameter_counts_equal_torchvision(factory, expected):
  # torchvision.models.resnetXX(num_classes=1000): sum(p.numel() for p in m.parameters()).
  assert _param_count(factory(1000), 64) == expected


def _small_resnet_count_by_hand(depth, width, classes, in_ch=3, widths=None):
  """Stem 3×3 conv + BN; per block two 3×3 convs + 2 BNs; 1×1 projection + BN entering stages 2, 3.

  Stage widths ``widths``, default (w, 2w, 4w).
  """
  n = (depth - 2) // 6
  widths = widths or (width, 2 * width, 4 * width)
  total = 9 * in_ch * widths[0] + 2 * widths[0]
  c_in = widths[0]
  for s, c in enumerate(widths):
    for b in range(n):
      total += 9 * c_in * c + 9 * c * c + 4 * c
      if c_in != c or (s > 0 and b == 0):  # a width change or a stride-2 block
        total += c_in * c + 2 * c
      c_in = c
  return total + widths[-1] * classes + classes


@pytest.mark.parametrize("depth,width", [(8, 16), (20, 16), (14, 8)])
def test_small_resnet_counts(depth, width):
  model = models.SmallResNet(depth, num_classes=10, width=width)
  assert _param_count(model, 32) == _small_resnet_count_by_hand(depth, width, 10)
  assert _small_resnet_count_by_hand(20, 16, 10) == 272_474  # ResNet-20 ≈ 0.27M (He et al. §4.2)


@pytest.mark.parametrize("factory,size,feat", [(models.ResNet18, 64, 512), (models.ResNet50, 64, 2048),
                                               (models.ResNet8, 28, 64), (models.ResNet20, 32, 64)])
def test_output_and_embedding_shapes(factory, size, feat):
  model = factory(num_classes=7)
  x = jnp.ones((2, size, size, 3))
  shapes = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x, return_embedding=True))
  (logits, emb), _ = shapes
  assert logits.shape == (2, 7) and emb.shape == (2, feat)


def test_split_points_compose_to_the_full_forward():
  model = models.ResNet8(num_classes=5)
  x = jax.random.normal(jax.random.key(1), (3, 28, 28, 1))
  variables = model.init(jax.random.key(0), x)
  full = model.apply(variables, x)
  for point in model.split_points():
    h = model.apply(variables, x, stop=point)
    np.testing.assert_allclose(model.apply(variables, h, start=point), full, rtol=1e-5, atol=1e-5)


def test_readable_parameter_paths():
  model = models.ResNet18(num_classes=10)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  paths = set(flatten_dict(variables["params"], sep="/"))
  for p in ["stem/conv/kernel", "stem/bn/scale", "stage4/block1/conv2/kernel",
            "stage4/block1/shortcut_conv/kernel", "stage4/block2/bn2/bias", "head/kernel", "head/bias"]:
    assert p in paths
  assert {k for k in flatten_dict(variables["batch_stats"], sep="/")} >= {"stem/bn/mean", "stem/bn/var"}


def test_leaky_relu_slope_and_relu():
  x = jnp.array([-2.0, 0.5])
  np.testing.assert_allclose(models.make_activation("leaky_relu", 0.1)(x), [-0.2, 0.5])
  np.testing.assert_allclose(models.make_activation("relu", 0.1)(x), [0.0, 0.5])
  relu, leaky = models.ResNet8(5, activation="relu"), models.ResNet8(5, activation="leaky_relu")
  x = jax.random.normal(jax.random.key(2), (2, 28, 28, 1))
  v = relu.init(jax.random.key(0), x)
  assert not np.allclose(relu.apply(v, x), leaky.apply(v, x))


def test_create_model_errors_name_the_field():
  cfg = ml_collections.ConfigDict(dict(name="resnet9", activation="leaky_relu", negative_slope=0.1))
  with pytest.raises(ValueError, match="model.name='resnet9' is unknown"):
    models.create_model(cfg, 10)
  cfg.name, cfg.activation = "resnet8", "gelu"
  with pytest.raises(ValueError, match="model.activation='gelu'"):
    models.create_model(cfg, 10)


def _shapes(model, image_size, channels):
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                jnp.zeros((1, image_size, image_size, channels))))
  return {k: v.shape for k, v in flatten_dict(variables["params"], sep="/").items()}


def test_create_model_per_stage_widths():
  config = config_util.model_config("resnet8", width=16, widths=(2, 4, 16))
  model = models.create_model(config, 10)
  shapes = _shapes(model, 8, 1)
  assert shapes["stem/conv/kernel"] == (3, 3, 1, 2)
  assert shapes["stage1/block1/conv2/kernel"] == (3, 3, 2, 2)
  assert shapes["stage2/block1/conv1/kernel"] == (3, 3, 2, 4)
  assert shapes["stage3/block1/shortcut_conv/kernel"] == (1, 1, 4, 16)
  assert shapes["head/kernel"] == (16, 10)
  count = sum(int(np.prod(s)) for s in shapes.values())
  assert count == _small_resnet_count_by_hand(8, 0, 10, in_ch=1, widths=(2, 4, 16))
  (_, emb), _ = jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), jnp.zeros((2, 8, 8, 1)), return_embedding=True))
  assert emb.shape == (2, 16)
  config.widths = None  # the architecture's (w, 2w, 4w)
  assert _shapes(models.create_model(config, 10), 8, 1)["head/kernel"] == (64, 10)
  wide50 = config_util.model_config("resnet50", widths=(4, 8, 16, 32))
  assert _shapes(models.create_model(wide50, 3), 32, 3)["head/kernel"] == (128, 3)  # 4× expansion


@pytest.mark.parametrize("widths", [(2, 4), (2, 0, 4), (2, 4, 8, 16), (2.0, 4, 8), (True, 4, 8)])
def test_create_model_bad_widths_name_the_field(widths):
  config = config_util.model_config("resnet8", width=4)
  config.widths = widths
  with pytest.raises(ValueError, match=r"^model\.widths=.* is not 3 positive integers: give one width "
                                       r"per stage of resnet8, or None for \(4, 8, 16\)\.$"):
    models.create_model(config, 10)
