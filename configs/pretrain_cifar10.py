r"""Pretrains a leaky-ReLU ResNet-20 on CIFAR-10 (TFDS; prepare it first with `tfds build cifar10`).

  python -m experiments.pretrain --config configs/pretrain_cifar10.py --workdir /tmp/pretrain_cifar10
  python -m experiments.pretrain --config configs/pretrain_cifar10.py:depth=56,relu --workdir ...

Recipe of He et al. (2016, §4.2): batch 128, SGD momentum 0.9, lr 0.1, weight decay 1e-4, 160 epochs
(here a cosine schedule), pad-4 random crop + flip. Expected: ≈ 91–92 % test accuracy for ResNet-20
(the paper's 91.25 % with ReLU). Not run on this project's CPU machines; numbers welcome in the README.
"""

import ml_collections

from lqf.runtime import config_util


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_util.parse_arg(arg, relu=False, depth=20, width=16, epochs=160)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = config_util.data_config("cifar10", image_size=32, augment=True)
  config.model = config_util.model_config(f"resnet{args.depth}", width=args.width,
                                          activation="relu" if args.relu else "leaky_relu")
  config.num_epochs = args.epochs
  config_util.training_config(config, batch_size=128, lr=0.1, weight_decay=1e-4, warmup_steps=400)
  config.eval_batch_size = 500
  return config
