"""Tests for lqf.models.torch_weights and lqf.models.recalibrate.

Against torch itself (skipped without torch): a ResNet written here in torchvision's exact module
layout, with random weights and random BatchNorm running statistics, gives the same logits as the
Flax ResNet the weights are imported into. Without torch: round trips, error messages, and the
recalibrated statistics against statistics computed by hand from captured activations.
"""

import sys

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.numpy

from lqf.models import ResNet8, ResNet18, ResNet34, ResNet50, create_model
from lqf.models import torch_weights
from lqf.models.recalibrate import recalibrate_batch_stats

TORCH_ARCHS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet50": ("bottleneck", (3, 4, 6, 3))}
FLAX_ARCHS = {"resnet18": ResNet18, "resnet50": ResNet50}


def _torch_resnet(name: str, num_classes: int, seed: int = 0):
  """torchvision's ResNet (v1.5) module layout, random weights and running stats, eval mode."""
  torch = pytest.importorskip("torch")
  nn = torch.nn

  class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
      super().__init__()
      self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.relu = nn.ReLU(inplace=True)
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.downsample = downsample

    def forward(self, x):
      identity = x if self.downsample is None else self.downsample(x)
      out = self.relu(self.bn1(self.conv1(x)))
      return self.relu(self.bn2(self.conv2(out)) + identity)

  class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
      super().__init__()
      self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # stride here: v1.5
      self.bn2 = nn.BatchNorm2d(planes)
      self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(planes * 4)
      self.relu = nn.ReLU(inplace=True)
      self.downsample = downsample

    def forward(self, x):
      identity = x if self.downsample is None else self.downsample(x)
      out = self.relu(self.bn1(self.conv1(x)))
      out = self.relu(self.bn2(self.conv2(out)))
      return self.relu(self.bn3(self.conv3(out)) + identity)

  class ResNet(nn.Module):

    def __init__(self, block, layers, num_classes):
      super().__init__()
      self.inplanes = 64
      self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
      self.bn1 = nn.BatchNorm2d(64)
      self.relu = nn.ReLU(inplace=True)
      self.maxpool = nn.MaxPool2d(3, 2, 1)
      self.layer1 = self._make_layer(block, 64, layers[0], 1)
      self.layer2 = self._make_layer(block, 128, layers[1], 2)
      self.layer3 = self._make_layer(block, 256, layers[2], 2)
      self.layer4 = self._make_layer(block, 512, layers[3], 2)
      self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
      self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride):
      downsample = None
      if stride != 1 or self.inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
            nn.BatchNorm2d(planes * block.expansion))
      layers = [block(self.inplanes, planes, stride, downsample)]
      self.inplanes = planes * block.expansion
      layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
      return nn.Sequential(*layers)

    def forward(self, x):
      x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
      x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
      return self.fc(torch.flatten(self.avgpool(x), 1))

  torch.manual_seed(seed)
  kind, layers = TORCH_ARCHS[name]
  model = ResNet(BasicBlock if kind == "basic" else Bottleneck, layers, num_classes)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.2)
        m.running_mean.normal_(0.0, 0.2)
        m.running_var.uniform_(0.5, 2.0)
  return model.eval()


def _numpy_state_dict(torch_model) -> dict[str, np.ndarray]:
  return {k: v.numpy().copy() for k, v in torch_model.state_dict().items()}


def _random_variables(model, input_shape, seed=0):
  """Random params (fan-in scaled kernels) and random batch stats, without running model.init."""
  rng = np.random.default_rng(seed)
  draw = {"kernel": lambda s: rng.normal(size=s) / np.sqrt(np.prod(s[:-1])),
          "scale": lambda s: rng.uniform(0.5, 1.5, s), "bias": lambda s: rng.normal(0.0, 0.2, s),
          "mean": lambda s: rng.normal(0.0, 0.2, s), "var": lambda s: rng.uniform(0.5, 2.0, s)}
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(input_shape))
  return {c: flax.traverse_util.unflatten_dict({
      path: jnp.asarray(draw[path[-1]](leaf.shape), jnp.float32)
      for path, leaf in flax.traverse_util.flatten_dict(tree).items()})
          for c, tree in shapes.items()}


def _zeros_state_dict(model, input_channels=3):
  """A torchvision-layout state dict with the model's shapes (values irrelevant), without init."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, input_channels)))
  return torch_weights.variables_to_state_dict(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                                                            shapes))


def _assert_trees_equal(a, b):
  flat_a, flat_b = (flax.traverse_util.flatten_dict(t) for t in (a, b))
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k]), err_msg=str(k))


@pytest.mark.parametrize("name,suffix", [("resnet18", ".pth"), ("resnet50", ".safetensors")])
def test_imported_weights_give_torch_logits(tmp_path, name, suffix):
  torch = pytest.importorskip("torch")
  tmodel = _torch_resnet(name, num_classes=10)
  x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
  with torch.no_grad():
    expected = tmodel(torch.from_numpy(x)).numpy()
  path = tmp_path / f"{name}{suffix}"
  if suffix == ".pth":
    torch.save(tmodel.state_dict(), path)
  else:
    safetensors.numpy.save_file(_numpy_state_dict(tmodel), str(path))

  model = FLAX_ARCHS[name](10, activation="relu")
  variables = torch_weights.load_torchvision(str(path), model)
  logits = jax.jit(model.apply)(variables, x.transpose(0, 2, 3, 1))
  assert np.abs(expected).max() > 0.1  # random BN statistics keep the logits away from zero
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_pth_wrapped_in_training_checkpoint(tmp_path):
  """timm/DDP training checkpoints: {"state_dict": {"module.conv1.weight": ...}, "epoch": ...}."""
  torch = pytest.importorskip("torch")
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  state = {k: torch.from_numpy(v) for k, v in _zeros_state_dict(ResNet8(5, width=4), 1).items()}
  state["layer1.0.bn1.weight"] = torch.arange(4.0, dtype=torch.bfloat16)
  path = tmp_path / "ckpt.pth"
  torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
  read = torch_weights.read_state_dict(str(path))
  assert read.keys() == state.keys()
  np.testing.assert_array_equal(read["layer1.0.bn1.weight"], np.arange(4.0, dtype=np.float32))
  safetensors.torch.save_file(state, str(tmp_path / "bf16.safetensors"))
  with pytest.raises(ValueError, match=r"holds 'BF16' tensors, which numpy cannot read"):
    torch_weights.read_state_dict(str(tmp_path / "bf16.safetensors"))


def test_export_is_torchvision_layout(tmp_path):
  """Export of imported weights gives back the torch tensors bit for bit and loads strictly."""
  torch = pytest.importorskip("torch")
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  tmodel = _torch_resnet("resnet18", num_classes=7)
  state = _numpy_state_dict(tmodel)
  variables = torch_weights.state_dict_to_variables(state, ResNet18(7))
  path = tmp_path / "r18.safetensors"
  torch_weights.save_torchvision(str(path), variables)
  exported = safetensors.torch.load_file(str(path))
  assert set(exported) == {k for k in state if not k.endswith("num_batches_tracked")}
  for k, v in exported.items():
    np.testing.assert_array_equal(v.numpy(), state[k], err_msg=k)
  fresh = _torch_resnet("resnet18", num_classes=7, seed=1)
  fresh.load_state_dict(exported, strict=True)  # fills num_batches_tracked itself
  x = torch.randn(2, 3, 64, 64)
  with torch.no_grad():
    np.testing.assert_array_equal(fresh(x).numpy(), tmodel(x).numpy())


def test_round_trip_is_bit_exact(tmp_path):
  model = ResNet8(5, width=4)
  variables = _random_variables(model, (1, 28, 28, 1))
  path = tmp_path / "r8.safetensors"
  torch_weights.save_torchvision(str(path), variables)
  _assert_trees_equal(torch_weights.load_torchvision(str(path), model, input_channels=1), variables)


def test_safetensors_import_without_torch(tmp_path, monkeypatch):
  model = ResNet8(5, width=4)
  variables = _random_variables(model, (1, 28, 28, 1))
  state = torch_weights.variables_to_state_dict(variables)
  safetensors.numpy.save_file(state, str(tmp_path / "r8.safetensors"))
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
  with pytest.raises(ImportError):
    import torch  # pylint: disable=g-import-not-at-top,unused-import,import-outside-toplevel
  loaded = torch_weights.load_torchvision(str(tmp_path / "r8.safetensors"), model, input_channels=1)
  _assert_trees_equal(loaded, variables)
  (tmp_path / "r8.pth").write_bytes(b"not read")
  with pytest.raises(ImportError, match=r"torch is not installed: pip install -e \.\[torch\]"):
    torch_weights.load_torchvision(str(tmp_path / "r8.pth"), model, input_channels=1)
  with pytest.raises(ValueError, match=r"pretrained\.path='.*r8\.npz' is neither \.safetensors"):
    torch_weights.load_torchvision(str(tmp_path / "r8.npz"), model, input_channels=1)


def test_relu_weights_load_into_leaky_model():
  """The activation comes from the config; the weights load unchanged."""
  state = torch_weights.variables_to_state_dict(_random_variables(ResNet8(3, width=4),
                                                                  (1, 28, 28, 1)))
  config = ml_collections.ConfigDict(dict(name="resnet8", width=4, activation="leaky_relu",
                                          negative_slope=0.2))
  leaky = create_model(config, 3)
  relu = ResNet8(3, width=4, activation="relu")
  _assert_trees_equal(torch_weights.state_dict_to_variables(state, leaky, input_channels=1),
                      torch_weights.state_dict_to_variables(state, relu, input_channels=1))


def test_missing_tensor_names_it_and_its_shape():
  state = _zeros_state_dict(ResNet18(10))
  del state["layer3.0.downsample.1.running_var"]
  with pytest.raises(ValueError) as e:
    torch_weights.state_dict_to_variables(state, ResNet18(10), source="r18.safetensors")
  assert str(e.value).startswith("r18.safetensors lacks layer3.0.downsample.1.running_var "
                                 "(expected (256,) for resnet18's stage3/block1/shortcut_bn/var)")
  assert "\n" not in str(e.value)


def test_misshaped_tensor_names_it_and_the_expected_shape():
  state = _zeros_state_dict(ResNet18(10))
  state["layer2.1.conv2.weight"] = np.zeros((128, 64, 3, 3), np.float32)
  with pytest.raises(ValueError, match=r"has shape \(128, 64, 3, 3\) for layer2\.1\.conv2\.weight "
                     r"\(expected \(128, 128, 3, 3\) for resnet18's stage2/block2/conv2/kernel\)"):
    torch_weights.state_dict_to_variables(state, ResNet18(10))


def test_wrong_architecture_says_what_the_file_is():
  with pytest.raises(ValueError, match=r"shape \(64, 64, 3, 3\) for layer1\.0\.conv1\.weight "
                     r"\(expected \(64, 64, 1, 1\) for resnet50's stage1/block1/conv1/kernel\); "
                     r"the file holds resnet18 "
                     r"\(BasicBlock blocks \(2, 2, 2, 2\), 7x7 stem of width 64 on 3 input channels, "
                     r"10 classes\)"):
    torch_weights.state_dict_to_variables(_zeros_state_dict(ResNet18(10)), ResNet50(10))
  with pytest.raises(ValueError, match=r"has 80 tensors resnet18 lacks \(first: "
                     r"layer1\.2\.conv1\.weight\); the file holds resnet34"):
    torch_weights.state_dict_to_variables(_zeros_state_dict(ResNet34(10)), ResNet18(10))


def test_other_resnet_variants_are_named_as_such():
  deep_stem = _zeros_state_dict(ResNet50(10))
  deep_stem["conv1.0.weight"] = deep_stem.pop("conv1.weight")  # timm's resnet50d stem
  with pytest.raises(ValueError, match=r"lacks conv1\.weight .* the file holds something other than "
                     r"a plain torchvision/timm ResNet"):
    torch_weights.state_dict_to_variables(deep_stem, ResNet50(10))
  wide = _zeros_state_dict(ResNet50(10))
  wide["layer1.0.conv2.weight"] = np.zeros((128, 128, 3, 3), np.float32)
  with pytest.raises(ValueError, match=r"for layer1\.0\.conv2\.weight .* the file holds a ResNet "
                     r"variant \(Bottleneck blocks \(3, 4, 6, 3\)"):
    torch_weights.state_dict_to_variables(wide, ResNet50(10))


def test_other_num_classes_needs_drop_head():
  state = _zeros_state_dict(ResNet18(1000))
  state["layer4.1.bn2.num_batches_tracked"] = np.array(7)
  with pytest.raises(ValueError, match=r"has shape \(1000, 512\) for fc\.weight .* pass "
                     r"drop_head=True"):
    torch_weights.state_dict_to_variables(state, ResNet18(37))
  variables = torch_weights.state_dict_to_variables(state, ResNet18(37), drop_head=True)
  assert "head" not in variables["params"]
  shapes = jax.eval_shape(ResNet18(37).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert jax.tree.map(jnp.shape, variables["params"]) == {
      k: v for k, v in jax.tree.map(jnp.shape, shapes["params"]).items() if k != "head"}


def _bn_inputs_by_hand(model, variables, x):
  """Each BatchNorm's input (= its conv's output) in inference mode, captured by Flax."""
  _, state = model.apply(variables, x, stop="head", capture_intermediates=True,
                         mutable=["intermediates"])
  convs = flax.traverse_util.flatten_dict(state["intermediates"])
  pairs = {"conv": "bn", "conv1": "bn1", "conv2": "bn2", "shortcut_conv": "shortcut_bn"}
  return {path[:-2] + (pairs[path[-2]],): np.asarray(out[0], np.float64)
          for path, out in convs.items() if len(path) > 1 and path[-2] in pairs}


def test_recalibrated_stats_equal_hand_computed_population_stats():
  model = ResNet8(5, width=4, activation="leaky_relu", negative_slope=0.1)
  variables = _random_variables(model, (1, 12, 12, 1))
  del variables["params"]["head"]  # as loaded with drop_head=True: the head is not needed
  x = np.random.default_rng(0).normal(1.0, 2.0, size=(13, 12, 12, 1)).astype(np.float32)
  new = recalibrate_batch_stats(model, variables, [x[:5], x[5:10], x[10:]])  # unequal batches
  _assert_trees_equal(new["params"], variables["params"])

  stats = flax.traverse_util.flatten_dict(new["batch_stats"])
  inputs = _bn_inputs_by_hand(model, new, x)  # whole data, inference mode, new statistics
  assert len(inputs) == len(stats) // 2 == 9
  for layer, h in inputs.items():
    np.testing.assert_allclose(stats[layer + ("mean",)], h.mean(axis=(0, 1, 2)), rtol=1e-5,
                               atol=1e-6, err_msg=str(layer))
    np.testing.assert_allclose(stats[layer + ("var",)], h.var(axis=(0, 1, 2)), rtol=1e-5,
                               err_msg=str(layer))
  old = flax.traverse_util.flatten_dict(variables["batch_stats"])
  assert all(np.abs(stats[k] - old[k]).max() > 0.05 for k in stats)  # they did change

  # The same statistics: train mode with momentum 0 when the whole data is one batch.
  _, one_batch = model.clone(bn_momentum=0.0).apply(variables, x, train=True, stop="head",
                                                     mutable=["batch_stats"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               new["batch_stats"], one_batch["batch_stats"])


def test_recalibrate_needs_batches():
  model = ResNet8(5, width=4)
  with pytest.raises(ValueError, match="pretrained.recalibrate_batches"):
    recalibrate_batch_stats(model, _random_variables(model, (1, 12, 12, 1)), [])
