r"""LQF fine-tuning of an ImageNet ResNet-50 on Oxford-IIIT Pet, CIFAR-10 or Caltech-101 (224 px).

  # torchvision's ImageNet weights (docs/weights.md), all 3,680 Pets training images:
  python -m experiments.finetune --config configs/finetune_r50.py \
      --config.pretrained.path=/path/resnet50.safetensors --workdir W
  # our own ImageNet pretraining (configs/pretrain_imagenet.py), CIFAR-10, 10 shots per class:
  python -m experiments.pretrain --config configs/pretrain_imagenet.py --workdir /tmp/pretrain_imagenet
  python -m experiments.finetune --config configs/finetune_r50.py:dataset=cifar10,source=orbax,shots=10 \
      --workdir W

Arguments: ``dataset`` (oxford_iiit_pet: 37 classes, 3,680 train / 3,669 test; cifar10: 10 classes,
50,000 / 10,000, upsampled from 32 px; caltech101: 102 classes, 30 per class = 3,060 train / 6,084 test,
no validation split — use ``data.heldout_fraction`` to validate), ``source`` (``torchvision``: a
.safetensors/.pth file at ``pretrained.path``, its ReLU weights loaded into the network of
``model.activation`` and the BatchNorm statistics recomputed on 20 training batches; ``orbax``: the
latest checkpoint of ``pretrained.workdir``, architecture and activation as pretrained, a missing one
naming ``pretrained.command``), ``shots`` (per class; 0 = the whole training split), ``slope``
(leaky-ReLU slope of a torchvision source), ``relu`` (keep ReLU: the ablation; with orbax, the workdir
of ``configs/pretrain_imagenet.py:relu``), ``method`` (as in configs/finetune_mnist.py). Prepare the
dataset once with ``tfds build <dataset>`` (needs TensorFlow on that machine only).

Trainable: stage4 + head (15.0M parameters for 37 classes). Two regimes (`lqf.runtime.memory.cache_plan`):

* few-shot (``shots`` > 0): full batch, no augmentation. The training images and their trunk features
  h are held in memory (images 224·224·3 + h 14·14·1024 float32 = 1.34 MiB per image: 0.5 GiB at
  10 shots on Pets); LQF takes 40 exact K-FAC steps. The test split (4.8 GiB of images + h on Pets)
  does not fit next to them in ``lqf.cache_gib`` = 4 GiB, so it is streamed once for the accuracy.
* all data (``shots=0``): minibatches of 128 with augmentation (random crop + flip), streamed:
  50,000 CIFAR-10 images would take 28 GiB as arrays and 37 GiB more as h (and the full-batch
  linearization of stage4 over them far more), so each jitted step runs the trunk on its batch and a
  jvp through the tail — K-FAC-preconditioned SGD with momentum (``lqf.optimizer='sgd'``,
  ``lqf.learning_rate='auto'``: 0.2 × the stable limit 2(1 + β)/λmax(MH) of the first batch;
  the exact quadratic step needs the full batch). K-FAC factors: one pass over the first ``lqf.kfac_examples``
  = 10,000 training images; the test accuracy: one pass over the test split. The grain iterator's
  position is checkpointed with the fit, so a rerun resumes exactly. Steps: 5 epochs on CIFAR-10 (1,953),
  20 on Pets (575) and Caltech-101 (478); the nonlinear baselines take the same batches and steps.

Precision (README, "Accelerators"): on a GPU or TPU the nonlinear baselines compute in bfloat16
(``nonlinear.dtype``; parameters and Adam's state float32; ``--config.nonlinear.dtype=float32`` on a
CPU, where bfloat16 is emulated and slower); LQF, its K-FAC factors and its certificates compute in
float32 with full-precision products whatever the platform.

Expected: not measured on this project's machines (no network for the weights or the datasets).
"""

import ml_collections

from lqf.runtime import config_util

DATASETS = {"oxford_iiit_pet": 3680, "cifar10": 50000, "caltech101": 3060}  # name: training images
SOURCES = ("torchvision", "orbax")
PRETRAIN = "python -m experiments.pretrain --config configs/pretrain_imagenet.py"
EPOCHS = {"oxford_iiit_pet": 20, "cifar10": 5, "caltech101": 20}  # with shots=0
BATCH_SIZE = 128


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_util.parse_arg(arg, dataset="oxford_iiit_pet", source="torchvision", shots=0,
                               slope=0.1, relu=False, method="lqf")
  if args.dataset not in DATASETS:
    raise ValueError(f"config argument dataset={args.dataset!r} is unknown: use one of {list(DATASETS)}.")
  if args.source not in SOURCES:
    raise ValueError(f"config argument source={args.source!r} is unknown: use one of {SOURCES}.")
  all_data = not args.shots
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.method = args.method
  config.data = config_util.data_config(args.dataset, image_size=224, shots=args.shots or None,
                                        augment=all_data)
  if args.source == "torchvision":
    config.model = config_util.model_config(
        "resnet50", activation="relu" if args.relu else "leaky_relu", negative_slope=args.slope)
    config.pretrained = ml_collections.ConfigDict(dict(
        format="torchvision",
        path=ml_collections.config_dict.placeholder(str),  # --config.pretrained.path=...
        recalibrate_bn=not args.relu,  # the leaky network's activations differ from the ReLU ones
        recalibrate_batches=20))
  else:
    relu_workdir = "/tmp/pretrain_imagenet_relu"
    config.pretrained = ml_collections.ConfigDict(dict(
        format="orbax", workdir=relu_workdir if args.relu else "/tmp/pretrain_imagenet",
        relu_workdir=relu_workdir, command=PRETRAIN + (":relu" if args.relu else "")))
  mnist = config_util.load_sibling(__file__, "finetune_mnist")
  config.lqf = mnist.lqf
  config.lqf.trainable = "^(stage4|head)/"  # the last stage and the head: 15,040,549 parameters
  config.lqf.curvature_batch_size = 16      # 37 backward passes of stage4 per example
  # 40 exact K-FAC steps (not the certified optimum: N·C = 13,690 at 10 shots is past the dense kernel's
  # size, lqf.solve.KERNEL_LIMIT, and CG on 15M parameters is unmeasured here).
  config.lqf.optimizer, config.lqf.regularizer = "quadratic", "euclidean"
  config.nonlinear = mnist.nonlinear
  config.nonlinear.dtype = "bfloat16"  # on a GPU/TPU (parameters stay float32); "float32" on a CPU
  config.checkpoint_every = mnist.checkpoint_every
  if all_data:
    steps = round(EPOCHS[args.dataset] * DATASETS[args.dataset] / BATCH_SIZE)
    config.lqf.batch_size = config.nonlinear.batch_size = BATCH_SIZE
    config.lqf.optimizer = "sgd"
    config.lqf.steps = config.lqf.ce_steps = config.nonlinear.steps = steps
    config.lqf.kfac_examples = 10_000
    config.checkpoint_every = 200
  config.overwrite = False
  return config
