r"""One fine-tuning run: the mnist5k digits-0–4 source model → digits 5–9 of `mnist5k` or `uci_digits`.

  python -m experiments.pretrain --config configs/pretrain_mnist.py --workdir /tmp/pretrain_mnist
  python -m experiments.finetune --config configs/finetune_mnist.py:method=lqf,shots=5 \
      --config.pretrained.workdir=/tmp/pretrain_mnist --workdir /tmp/finetune_mnist

Arguments: ``method`` (any of `lqf.methods`: lqf, lqf_relu, lqf_loo, lqf_steps, lqf_euclidean,
lqf_euclidean_loo, lqf_ce, lqf_no_kfac, linear_probe, nonlinear, nonlinear_all),
``shots`` (0 = all), ``target`` (mnist5k or uci_digits). ``lqf_relu`` reads
``config.pretrained.relu_workdir`` (pretrained with ``configs/pretrain_mnist.py:relu``).
Writes ``result.json`` with the test accuracy; see ``configs/compare_mnist.py`` for the whole sweep.
"""

import ml_collections
from ml_collections import config_dict

from lqf.runtime import config_util

PRETRAIN = "python -m experiments.pretrain --config configs/pretrain_mnist.py"


def target_data(name: str) -> ml_collections.ConfigDict:
  """The demo targets: digits 5–9, unseen by the source, of mnist5k or of uci_digits (8×8 scans → 28×28)."""
  return config_util.data_config(name, image_size=28, classes=(5, 6, 7, 8, 9))


def lqf_config() -> ml_collections.ConfigDict:
  """LQF settings shared by the fine-tuning and comparison configs (`lqf.methods.LQFSettings`)."""
  return ml_collections.ConfigDict(dict(
      trainable="^(stage3|head)/",   # the last stage and the head (58,053 parameters for 5 classes)
      target_scale=15.0,             # s in ‖f_lin(x) − s·e_y‖²
      weight_decay=1e-3,             # λ of the penalty on δ = w − w0 (also the steps' K-FAC damping)
      optimizer="exact",             # lqf: the certified optimum δ* (lqf.solve); "quadratic": `steps` K-FAC
      #                                steps with the exact step size (full batch), "sgd" (minibatches)
      regularizer="kfac",            # (λ/2)δᵀMδ in K-FAC's metric (lqf.metric), or "euclidean": (λ/2)‖δ‖²
      metric_damping=1e-3,           # μ of that metric, M = K-FAC curvature + μI
      steps=40,                      # steps of lqf_steps and lqf_no_kfac (and lqf with optimizer "quadratic")
      batch_size=config_dict.FieldReference(None, field_type=int),  # None: full batch; else minibatches
      preconditioner="kfac",         # "kfac" | "nystrom" (lqf.nystrom: sketch of JᵀJ, cached features only)
      nystrom_rank=128,              # ℓ of the Nyström sketch
      # "sgd": "auto" = 0.2 × the stable limit 2(1 + β)/λmax(MH) (lqf.stability), or a number
      learning_rate=config_dict.FieldReference("auto", field_type=object), momentum=0.9,
      ce_learning_rate=0.1, ce_steps=100,  # lqf_ce: K-FAC + SGD (momentum 0.9) on cross-entropy
      kfac_examples=config_dict.FieldReference(None, field_type=int),  # K-FAC pass: first N (None: all)
      curvature_batch_size=128,      # examples per K-FAC / Nyström chunk (memory: ~C backward passes each)
      cache_features="auto",         # "auto" | "always" | "never": hold images + trunk features in memory
      cache_gib=4.0,                 # "auto" budget for them (GiB); above it, or with augmentation: stream
      head_init="ridge", head_ridge=1.0))  # ridge penalty α = head_ridge · N


def nonlinear_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      steps=100, learning_rate=1e-3, weight_decay=0.0, batch_size=128,
      dtype="float32"))  # compute dtype of the nonlinear baselines: "bfloat16" on a GPU or TPU


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_util.parse_arg(arg, method="lqf", shots=5, target="mnist5k")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.method = args.method
  config.pretrained = ml_collections.ConfigDict(dict(
      workdir="/tmp/pretrain_mnist", relu_workdir="/tmp/pretrain_mnist_relu", command=PRETRAIN))
  config.data = target_data(args.target)
  config.data.shots = args.shots or None
  config.lqf = lqf_config()
  config.nonlinear = nonlinear_config()
  config.checkpoint_every = 20  # fit steps between checkpoints (0: none); a rerun resumes
  config.overwrite = False      # True: start over in a workdir that holds another config's run
  return config
