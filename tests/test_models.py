"""Model family: torchvision parameter counts, shapes, split points, activations."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from lqf import models


def _param_count(model, image_size):
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3))))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize("factory,expected", [
    (models.ResNet18, 11_689_512), (models.ResNet34, 21_797_672), (models.ResNet50, 25_557_032),
    (models.ResNet101, 44_549_160)])
def test_parameter_counts_equal_torchvision(factory, expected):
  # torchvision.models.resnetXX(num_classes=1000): sum(p.numel() for p in m.parameters()).
  assert _param_count(factory(1000), 64) == expected


def _small_resnet_count_by_hand(depth, width, classes, in_ch=3):
  """Stem 3×3 conv + BN; per block two 3×3 convs + 2 BNs; 1×1 projection + BN entering stages 2, 3."""
  n = (depth - 2) // 6
  total = 9 * in_ch * width + 2 * width
  c_in = width
  for c in (width, 2 * width, 4 * width):
    for b in range(n):
      total += 9 * c_in * c + 9 * c * c + 4 * c
      if c_in != c:
        total += c_in * c + 2 * c
      c_in = c
  return total + 4 * width * classes + classes


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
