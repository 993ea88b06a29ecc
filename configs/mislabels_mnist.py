r"""Finding mislabelled training examples with LQF's exact leave-one-out, and training without them.

  python -m experiments.mislabels --config configs/mislabels_mnist.py --workdir /tmp/mislabels
  python -m experiments.mislabels --config configs/mislabels_mnist.py:quick --workdir /tmp/mislabels_quick

Arguments (comma-separated): ``quick`` (two seeds, a 3-step source, 6 shots, 10 nonlinear steps: for
tests), ``seeds=5``, ``shots=25``, ``uci`` (adds digits 5–9 of `uci_digits` as a second target).

Setting (`experiments/mislabels.py`). Source: the demo's leaky ResNet-8 pretrained on `mnist5k` digits 0–4
(``configs/compare_mnist.py``'s ``pretrain`` section, trained into ``<workdir>/source`` if missing).
Target: digits 5–9 of `mnist5k`, 25 shots per class (125 images), 10 % of them (12) relabelled to another
class per seed. LQF on the last stage + head (λ = 1e-3, s = 15, ridge head on the noisy labels; its
default fit, the exact optimum of ridge in K-FAC's metric, by CG to relative residual 1e-4); nonlinear baseline = the compare demo's (Adam
1e-3, 100 steps, same layers, cross-entropy).

Expected (results/mislabels_mnist/results.md, README "What only a linear model can do"): the exact
leave-one-out loss finds the flipped labels with a higher average precision than the fitted model's
training loss or margin and the nonlinear model's loss; dropping its top 12 recovers most of the accuracy
lost to the noise. ≈ 5 min on a 2-core CPU.
"""

import ml_collections

from lqf.runtime import config_util


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_util.parse_arg(arg, quick=False, seeds=5, shots=25, uci=False)
  compare = config_util.load_sibling(__file__, "compare_mnist")
  config = ml_collections.ConfigDict()
  config.pretrain = compare.pretrain
  config.targets = ml_collections.ConfigDict({"mnist5k_5-9": compare.targets["mnist5k_5-9"]})
  if args.uci:
    config.targets["uci_digits_5-9"] = compare.targets["uci_digits_5-9"]
  for target in config.targets.values():
    target.shots = args.shots
  config.noise_fraction = 0.1       # share of the training set relabelled to another class
  config.seeds = tuple(range(args.seeds))
  config.lqf = compare.lqf
  config.nonlinear = compare.nonlinear
  config.tol = 1e-4                 # relative residual of the exact optimum (and of forgetting)
  config.maxiter = 300
  config.kernel_batch_size = 25     # examples per per-example-Jacobian batch of the KernelFit
  config.overwrite = False          # True: reuse a workdir that holds a run of another config
  if args.quick:
    config.pretrain.num_steps = 3
    config.pretrain.log_every = config.pretrain.checkpoint_every = 1
    for target in config.targets.values():
      target.shots = 6
    config.seeds = (0, 1)
    config.nonlinear.steps = 10
  return config
