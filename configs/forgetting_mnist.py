r"""Certified forgetting: remove 1, 10 and 25 % of a 25-shot training set from the exact LQF optimum.

  python -m experiments.forgetting --config configs/forgetting_mnist.py --workdir /tmp/forgetting
  python -m experiments.forgetting --config configs/forgetting_mnist.py:quick --workdir /tmp/forgetting_quick

Arguments (comma-separated): ``quick`` (two seeds, a 3-step source, 6-shot pool, fractions 10 and 25 %:
for tests), ``seeds=5``.

Setting (`experiments/forgetting.py`). Source: the demo's leaky ResNet-8 pretrained on `mnist5k` digits
0–4 (``configs/compare_mnist.py``'s ``pretrain`` section, trained into ``<workdir>/source`` if missing).
Target: digits 5–9 of `mnist5k`; per seed a 30-shot pool per class, of which 1/6 (25 images) fits the
ridge head and the rest (125 images, ≈ 25 per class) is the training set; LQF on the last stage + head
(λ = 1e-3, s = 15, its default penalty: ridge in K-FAC's metric), its exact optimum — the deployed model —
by CG to relative residual 1e-4. Forget 1, 10 and 25 % of the
training set (1, 12 and 31 images), in kernel form and in parameter space, against retraining.

Expected (results/forgetting_mnist/results.md, README "What only a linear model can do"): both forms reach
the certificate ρ ≤ 1e-4 and land within ~1e-3 (relative) of the optimum retrained from scratch; the kernel
downdate takes a few CG iterations instead of the retraining's ~40 kernel-CG iterations; the forgotten
examples' accuracy drops from ~100 % (seen) to the level of never-seen test images. ≈ 5 min on a 2-core CPU.
"""

import ml_collections

from lqf.runtime import config_util


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_util.parse_arg(arg, quick=False, seeds=5)
  compare = config_util.load_sibling(__file__, "compare_mnist")
  config = ml_collections.ConfigDict()
  config.pretrain = compare.pretrain
  config.data = compare.targets["mnist5k_5-9"]
  config.data.shots = 30              # labelled pool per class: head part + training part
  config.data.heldout_fraction = 1 / 6  # the pool's share that fits the head (25 of 150 images)
  config.fractions = (0.01, 0.1, 0.25)
  config.seeds = tuple(range(args.seeds))
  config.lqf = compare.lqf
  config.tol = 1e-4                   # relative residual of every exact solve (forget and retrain)
  config.tight_tol = 1e-6             # the kernel form once more to this residual (a tighter certificate)
  config.maxiter = 1000               # CG cap (parameter-space CG takes a few hundred here)
  config.kernel_batch_size = 25       # examples per per-example-Jacobian batch of the KernelFit
  config.overwrite = False            # True: reuse a workdir that holds a run of another config
  if args.quick:
    config.pretrain.num_steps = 3
    config.pretrain.log_every = config.pretrain.checkpoint_every = 1
    config.data.shots = 6
    config.fractions = (0.1, 0.25)
    config.seeds = (0, 1)
  return config
