r"""Pretrains a leaky-ReLU ResNet-50 on ImageNet-1k: the TPU-pod job that makes LQF's source model.

On every host of a TPU pod (each reads its own 1/process_count of the data; checkpoints are written by all
hosts into a shared bucket or filesystem):

  python -m experiments.pretrain --config configs/pretrain_imagenet.py \
      --config.distributed=True --config.data.data_dir=gs://BUCKET/tensorflow_datasets \
      --workdir gs://BUCKET/runs/r50_leaky

Recipe (Goyal et al. 2017): global batch 1024, SGD Nesterov momentum 0.9, lr 0.1·batch/256 = 0.4 with 5 warm-up
epochs then cosine, weight decay 1e-4 on kernels, 90 epochs, random crop + flip at 224 px, bfloat16 compute with
float32 parameters. Expected ≈ 76 % top-1 (the ReLU ResNet-50 reference is 76.1 %). Not run by this project.
``:relu`` gives the ReLU network for the ablation; ``:runlocal`` shrinks it to a CPU smoke run (ResNet-18,
batch 8, 10 steps) for users with imagenet2012 prepared locally.
"""

import ml_collections

from lqf.runtime import config_util


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_util.parse_arg(arg, relu=False, runlocal=False, model="resnet50")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = config_util.data_config("imagenet2012", image_size=224, augment=True,
                                        test_split="validation")
  config.model = config_util.model_config(args.model, activation="relu" if args.relu else "leaky_relu",
                                          dtype="bfloat16")
  config.num_epochs = 90
  config_util.training_config(config, batch_size=1024, lr=0.4, weight_decay=1e-4, warmup_steps=6255)
  config.checkpoint_every = 1000
  config.log_every = 100
  config.distributed = True
  if args.runlocal:
    config.model.name, config.model.dtype = "resnet18", "float32"
    config.num_epochs, config.num_steps = 0, 10
    config.batch_size = config.eval_batch_size = 8
    config.distributed = False
  return config
