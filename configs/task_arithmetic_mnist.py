r"""Task arithmetic: add the task vectors of two fine-tunings of one source, LQF vs nonlinear.

  python -m experiments.task_arithmetic --config configs/task_arithmetic_mnist.py --workdir /tmp/arith
  python -m experiments.task_arithmetic --config configs/task_arithmetic_mnist.py:quick --workdir /tmp/aq

Arguments (comma-separated): ``quick`` (two seeds, a 3-step source, 6-shot pools, 5 K-FAC and 10 Adam
steps, a 4-point α grid: for tests), ``seeds=5``.

Setting (`experiments/task_arithmetic.py`). Source: the demo's leaky ResNet-8 pretrained on `mnist5k`
digits 0–4 (``configs/compare_mnist.py``'s ``pretrain`` section, trained into ``<workdir>/source`` if
missing). Tasks: digits 5–9 of `mnist5k` (500 test images) and of `uci_digits` (179), each a 30-shot
pool per class per seed, 1/6 of it held out (25 images) to choose α. Each task's ridge head is fitted on
its training set and frozen; the last stage (``lqf.trainable='^stage3/'``, 57,728 parameters shared by
both tasks) is fine-tuned by LQF (40 K-FAC steps, λ = 1e-3, s = 15) and by nonlinear fine-tuning
(cross-entropy, Adam 1e-3, 100 steps). α ∈ {0, 0.1, …, 1.5}.

Expected (results/task_arithmetic_mnist/results.md, README "What only a linear model can do"): see the
measured numbers there; ≈ 3 min on a 2-core CPU.
"""

import ml_collections
import numpy as np

from lqf.runtime import config_util


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_util.parse_arg(arg, quick=False, seeds=5)
  compare = config_util.load_sibling(__file__, "compare_mnist")
  config = ml_collections.ConfigDict()
  config.pretrain = compare.pretrain
  config.tasks = compare.targets  # digits 5–9 of mnist5k and of uci_digits
  for data in config.tasks.values():
    data.shots = 30                    # labelled pool per class: training part + held-out part
    data.heldout_fraction = 1 / 6      # the pool's share that chooses α (25 of 150 images)
  config.seeds = tuple(range(args.seeds))
  config.scales = tuple(np.round(np.arange(0.0, 1.51, 0.1), 2).tolist())  # the α grid
  config.lqf = compare.lqf
  # This study's results were measured with the 40-step K-FAC fit (lqf_steps), not the certified optimum
  # that is lqf's default since: kept so that a rerun reproduces them.
  config.lqf.optimizer, config.lqf.regularizer = "quadratic", "euclidean"
  config.lqf.trainable = "^stage3/"    # the shared layers; each task's head stays frozen
  config.nonlinear = compare.nonlinear
  config.overwrite = False             # True: reuse a workdir that holds a run of another config
  if args.quick:
    config.pretrain.num_steps = 3
    config.pretrain.log_every = config.pretrain.checkpoint_every = 1
    for data in config.tasks.values():
      data.shots = 6
    config.seeds = (0, 1)
    config.scales = (0.0, 0.5, 1.0, 1.5)
    config.lqf.steps = 5
    config.nonlinear.steps = 10
  return config
