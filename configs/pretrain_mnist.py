r"""Pretrains the demo's source model: a small leaky-ReLU ResNet-8 on `mnist5k` digits 0–4.

  python -m experiments.pretrain --config configs/pretrain_mnist.py --workdir /tmp/pretrain_mnist
  python -m experiments.pretrain --config configs/pretrain_mnist.py:relu --workdir /tmp/pretrain_mnist_relu

Arguments (comma-separated): ``relu`` (the ReLU network for the LQF ablation), ``classes=5-9`` (another
digit range), ``steps=N``.

Expected: ≥ 98 % test accuracy on the 500 held-out `mnist5k` images of digits 0–4, in well under 3 minutes on
a 2-core CPU (measured: see the README's results section).
"""

import ml_collections


def parse_arg(arg: str | None) -> dict[str, str]:
  """``"relu,steps=120"`` -> ``{"relu": "", "steps": "120"}``."""
  out = {}
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    out[key.strip()] = value.strip()
  return out


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = ml_collections.ConfigDict(dict(
      name="mnist5k", image_size=28, classes=(0, 1, 2, 3, 4), shots=None, shot_seed=0, augment=False,
      data_dir=None, train_split="train", test_split="test"))
  if "classes" in args:
    lo, hi = map(int, args["classes"].split("-"))
    config.data.classes = tuple(range(lo, hi + 1))
  config.model = ml_collections.ConfigDict(dict(
      name="resnet8", width=16, activation="relu" if "relu" in args else "leaky_relu",
      negative_slope=0.1, bn_momentum=0.9, dtype="float32"))
  config.batch_size = 128
  config.eval_batch_size = 256
  config.num_steps = int(args.get("steps", 150))
  config.optim = ml_collections.ConfigDict(dict(
      lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, warmup_steps=10))
  config.eval_every = 0  # once per epoch
  config.log_every = 25
  config.checkpoint_every = 25
  config.keep_checkpoints = 2
  config.distributed = False
  config.overwrite = False
  return config
