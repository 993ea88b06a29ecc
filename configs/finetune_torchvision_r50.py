r"""LQF fine-tuning of torchvision's ImageNet ResNet-50 on Oxford-IIIT Pet (37 classes, 224 px).

  python -m experiments.finetune --config configs/finetune_torchvision_r50.py \
      --config.pretrained.path=/path/resnet50.safetensors --workdir W
  python -m experiments.finetune --config configs/finetune_torchvision_r50.py:shots=5,slope=0.05 ...

Make the weights file where torchvision is installed (no torch is needed to read it here):

  python -c "import torchvision, safetensors.torch as st; st.save_file(torchvision.models.resnet50(
      weights='IMAGENET1K_V2').state_dict(), 'resnet50.safetensors')"

and prepare the dataset once with `tfds build oxford_iiit_pet` (needs TensorFlow on that machine
only; reading it here uses `tfds.data_source`). The ReLU weights go into the leaky-ReLU ResNet-50
(``model.activation``/``negative_slope``); the BatchNorm statistics are then recomputed over
``pretrained.recalibrate_batches`` training batches (`lqf.models.recalibrate`). See docs/weights.md.

Arguments: ``shots`` (per class, 0 = all 3,680 training images), ``slope`` (leaky-ReLU slope),
``relu`` (keep ReLU: the ablation), ``method`` (as in configs/finetune_mnist.py).
Expected: not measured on this project's machines (no network for the weights or the dataset).
"""

import ml_collections

from lqf import config_util


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_util.parse_arg(arg, shots=0, slope=0.1, relu=False, method="lqf")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.method = args.method
  config.data = config_util.data_config("oxford_iiit_pet", image_size=224, shots=args.shots or None)
  config.model = config_util.model_config(
      "resnet50", activation="relu" if args.relu else "leaky_relu", negative_slope=args.slope)
  config.pretrained = ml_collections.ConfigDict(dict(
      path=ml_collections.config_dict.placeholder(str),  # --config.pretrained.path=...
      format="torchvision",         # "torchvision" (.safetensors / .pth) or "orbax"
      recalibrate_bn=not args.relu,  # the leaky network's activations differ from the ReLU ones
      recalibrate_batches=20))
  mnist = config_util.load_sibling(__file__, "finetune_mnist")
  config.lqf = mnist.lqf
  config.lqf.trainable = "^(stage4|head)/"  # the last stage and the head: 15,040,549 parameters
  config.nonlinear = mnist.nonlinear
  return config
