r"""PC training on `mnist5k`: can a model update avoid negative flips (old right, new wrong)?

  python -m experiments.update --config configs/update_pct_mnist.py --workdir /tmp/update_pct
  python -m experiments.update --config configs/update_pct_mnist.py:smoke --workdir /tmp/pct_smoke
  # any prepared TFDS dataset, e.g.: --config.data.name=cifar100 --config.data.image_size=32

Arguments (comma-separated): ``smoke`` (a few steps, tiny nets, 1 seed: for tests),
``seeds=3``, ``dataset=mnist5k``.

Setting. Old model: leaky ResNet-8, width 8, 150 steps; new model: leaky ResNet-8, width 16
(4× the parameters), 250 steps; both on all 10 digits of `mnist5k` at 16×16 pixels, trained on
the train split minus a 20 % held-out part (3,200 images; the held-out 800 serve seed selection
only). 16 px and these step counts keep the full study (22 models) to ≈ 15–20 min on a shared
2-core CPU, and leave the old model at a few % error (≈ 4 %) so that the 1,000 test images hold
enough flips to measure (at 28 px and long training MNIST models flip too rarely).
Methods: none, KD (α=1, β=0), FD-KL (α=1, β=5, T=100, as in the paper), FD-LM (α=1, β=5),
LDI against the logit mean of 3 plain new models, the 3-model ensemble paragon, and seed
selection among 3 seeds by held-out NFR. λ = 1 everywhere.

Expected (see docs/compat.md for the measured table): old error ≈ 4 %, new error ≈ 2.5–3 %;
distillation lowers NFR relative to none.
"""

import ml_collections

from lqf import config_util


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_util.parse_arg(arg, smoke=False, seeds=3, dataset="mnist5k")
  config = ml_collections.ConfigDict()
  config.study = "pct"
  config.seed = 0
  config.num_seeds = args.seeds
  config.data = config_util.data_config(args.dataset, image_size=16)
  config_util.training_config(config, batch_size=128, lr=0.1, weight_decay=5e-4, warmup_steps=10)
  config.eval_batch_size = 500
  config.eval_every = 250
  config.old = ml_collections.ConfigDict(dict(
      model=config_util.model_config("resnet8", width=8), num_steps=150))
  config.new = ml_collections.ConfigDict(dict(
      model=config_util.model_config("resnet8", width=16), num_steps=250))
  config.heldout_fraction = 0.2
  config.heldout_seed = 0
  config.ensemble_size = 3
  config.selection = ml_collections.ConfigDict(dict(candidates=3, criterion="nfr"))
  config.methods = ml_collections.ConfigDict(dict(
      kd=dict(method="kd", lam=1.0, temperature=100.0),
      fd_kl=dict(method="fd_kl", lam=1.0, alpha=1.0, beta=5.0, temperature=100.0),
      fd_lm=dict(method="fd_lm", lam=1.0, alpha=1.0, beta=5.0),
      ldi=dict(method="ldi", lam=1.0, xi=0.0, p=2.0)))
  if args.smoke:
    config.num_seeds = 1
    config.data.image_size = 8
    config.batch_size = 32
    config.old.model.width = config.new.model.width = 4
    config.old.num_steps, config.new.num_steps = 2, 3
    config.ensemble_size = config.selection.candidates = 2
    config.log_every = 1
  return config
