r"""Pretrains the demo's source model: a small leaky-ReLU ResNet-8 on `mnist5k` digits 0–4.

  python -m experiments.pretrain --config configs/pretrain_mnist.py --workdir /tmp/pretrain_mnist
  python -m experiments.pretrain --config configs/pretrain_mnist.py:relu --workdir /tmp/pretrain_mnist_relu

Arguments (comma-separated): ``relu`` (the ReLU network for the LQF ablation), ``classes=0-4`` (the digits),
``steps=150``, ``dataset=mnist5k``, ``model=vit`` (a small Vision Transformer, `lqf.models.vit`: patches 7×7 (16 tokens),
width 64, 4 blocks, 4 heads, leaky-ReLU MLPs — or ``gelu`` — instead of the ResNet-8; ``lr``).

Expected: ≥ 98 % test accuracy on the 500 held-out `mnist5k` images of digits 0–4, in well under 3 minutes
on a 2-core CPU (see the README's results section for the measured numbers).
"""

import ml_collections

from lqf.runtime import config_util


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_util.parse_arg(arg, relu=False, gelu=False, classes=(0, 1, 2, 3, 4), steps=150,
                               dataset="mnist5k", model="resnet8", lr=0.1)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = config_util.data_config(args.dataset, image_size=28, classes=tuple(args.classes))
  activation = "relu" if args.relu else "gelu" if args.gelu else "leaky_relu"
  config.model = config_util.model_config(args.model, activation=activation)
  if args.model == "vit":
    config.model.update(width=64, patch_size=7, depth=4, num_heads=4, mlp_dim=128)
  config.num_steps = args.steps
  config_util.training_config(config, batch_size=128, lr=args.lr, weight_decay=5e-4, warmup_steps=10)
  config.log_every = 25
  config.checkpoint_every = 25
  return config
