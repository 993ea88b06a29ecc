r"""BCT on `mnist5k`: a new embedding model (digits 0–9) compatible with an old one (digits 0–4).

  python -m experiments.update --config configs/update_bct_mnist.py --workdir /tmp/update_bct
  python -m experiments.update --config configs/update_bct_mnist.py:smoke --workdir /tmp/bct_smoke
  # a prepared TFDS dataset: --config.data.name=cifar100 --config.data.image_size=32 with
  # configs/update_bct_mnist.py:old_classes=0-49,new_classes=0-99

Arguments (comma-separated): ``smoke`` (a few steps, tiny nets, 1 seed: for tests), ``seeds=6``,
``dataset=mnist5k``, ``old_classes=0-4``, ``new_classes=0-9`` (must start with the old classes).

Setting (the reference implementation's construction, openBCT). Per run (seed): an old model,
leaky ResNet-8 width 16 (stage widths 16, 32, 64: 64-d embedding), 200 steps on digits 0–4 (2,000
images); new models, 250 steps on digits 0–9 (4,000 images), in two architectures: ``same`` (the
old network) and ``wider`` (stage widths 32, 64, 64: twice the width in the first two stages, 2.0×
the parameters — 155,498 vs 77,754 — and the same 64-d embedding the old gallery holds: BCT compares
embeddings of equal dimension). For each: new* (cross-entropy only), BCT (CE + λ·CE through the old
pseudo classifier: class means of the old model's L2-normalized embeddings of the new training set,
no bias, λ = 1) and L2 (the squared distance of the L2-normalized new and old embeddings alone, the
reference's baseline, summed over the 64 dimensions where openBCT averages: see
`experiments.update_bct.l2_loss_fn`). Heterogeneous pair: the cloud is new* (same), the edge a
ResNet-8 with stage widths (4, 8, 64) (27 % of the cloud's multiply-adds, same 64-d embedding)
trained with the influence loss through the cloud's head, next to an independent edge*. 16×16 pixels
keep a run (9 models) to ≈ 3 min of CPU on 2 cores. Retrieval: the 1,000 test images as queries and
gallery, self excluded; also within the old and within the new digits.

Expected: results/update_bct_mnist/results.md and docs/compat.md ("BCT") hold the measured tables.
"""

import ml_collections

from lqf.runtime import config_util


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_util.parse_arg(arg, smoke=False, seeds=6, dataset="mnist5k",
                               old_classes=(0, 1, 2, 3, 4), new_classes=tuple(range(10)))
  config = ml_collections.ConfigDict()
  config.study = "bct"
  config.seed = 0
  config.num_seeds = args.seeds
  config.data = config_util.data_config(args.dataset, image_size=16)
  config_util.training_config(config, batch_size=128, lr=0.1, weight_decay=5e-4, warmup_steps=10)
  config.eval_batch_size = 500
  config.eval_every = 250
  config.old = ml_collections.ConfigDict(dict(
      model=config_util.model_config("resnet8", width=16), num_steps=200,
      classes=tuple(args.old_classes)))
  config.new = ml_collections.ConfigDict(dict(
      models=dict(same=config_util.model_config("resnet8", width=16),
                  wider=config_util.model_config("resnet8", widths=(32, 64, 64))),
      num_steps=250, classes=tuple(args.new_classes), influence_lam=1.0))
  config.edge = ml_collections.ConfigDict(dict(
      model=config_util.model_config("resnet8", widths=(4, 8, 64)), num_steps=250,
      influence_lam=1.0))
  if args.smoke:
    config.num_seeds = 1
    config.data.image_size = 8
    config.batch_size = 32
    config.old.model.width = config.edge.model.width = 4
    config.new.models = ml_collections.ConfigDict(dict(
        same=config_util.model_config("resnet8", width=4),
        wider=config_util.model_config("resnet8", widths=(8, 16, 16))))
    config.edge.model.widths = (2, 4, 16)
    config.old.num_steps = config.new.num_steps = config.edge.num_steps = 3
    config.log_every = 1
  return config
