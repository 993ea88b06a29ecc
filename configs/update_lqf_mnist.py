r"""Regression-free linear fine-tuning: an LQF model update with FD-LM against the old model.

  python -m experiments.update --config configs/update_lqf_mnist.py --workdir /tmp/update_lqf
  python -m experiments.update --config configs/update_lqf_mnist.py:quick --workdir /tmp/lqf_quick

Arguments (comma-separated): ``quick`` (one target, one seed, 2 → 5 shots, 5 LQF steps, two
methods, no certificate, a 3-step source: for tests), ``seeds=3``, ``old_shots=5``, ``new_shots=25``.

Setting (a data update, `experiments/update_lqf.py`). Source: the demo's leaky ResNet-8 pretrained on
`mnist5k` digits 0–4 (``configs/compare_mnist.py``'s ``pretrain`` section, trained into
``<workdir>/source`` if missing). Targets: digits 5–9 of `mnist5k` (500 test images) and of
`uci_digits` (179). Per seed: the old model is LQF fine-tuned (last stage + head, K-FAC, 40 exact
steps, s = 15, λ = 1e-3, ridge head) on ``old_shots`` images per class; the new model on
``new_shots`` per class, a superset drawn with the same ``shot_seed``: plainly (``none``), with KD by
logit matching (α = 1, β = 0, λ = 0.3) and with FD-LM (α = 1, β = 5) at λ ∈ {0.03, 0.1, 1} (λ
multiplies ½‖f − φ‖², next to the least squares' ½‖f − s·e_y‖²; λ = 1 is the paper's).

Expected: see results/update_lqf_mnist/results.md and docs/compat.md ("Regression-free linear
fine-tuning"); ≈ 2 min on a 2-core CPU including the source's pretraining.
"""

import ml_collections

from lqf.runtime import config_util


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_util.parse_arg(arg, quick=False, seeds=3, old_shots=5, new_shots=25)
  compare = config_util.load_sibling(__file__, "compare_mnist")
  config = ml_collections.ConfigDict()
  config.study = "lqf_pct"
  config.pretrain = compare.pretrain
  config.targets = compare.targets
  config.old_shots = args.old_shots
  config.new_shots = args.new_shots
  config.seeds = tuple(range(args.seeds))
  config.lqf = compare.lqf
  # This study's results were measured with the 40-step K-FAC fit (lqf_steps), not the certified optimum
  # that is lqf's default since: kept so that a rerun reproduces them.
  config.lqf.optimizer, config.lqf.regularizer = "quadratic", "euclidean"
  config.methods = ml_collections.ConfigDict({
      "fd_lm_lam0_03": dict(alpha=1.0, beta=5.0, lam=0.03),
      "fd_lm_lam0_1": dict(alpha=1.0, beta=5.0, lam=0.1),
      "fd_lm_lam1": dict(alpha=1.0, beta=5.0, lam=1.0),  # the paper's α, β, λ
      "kd_lam0_3": dict(alpha=1.0, beta=0.0, lam=0.3)})
  # The fit whose optimum the exact solver (kernel-form PCG) certifies, on the first target and seed
  # (None: no certificate).
  config.certify = ml_collections.ConfigDict(dict(method="fd_lm_lam1", tol=1e-4, maxiter=200))
  config.overwrite = False  # True: reuse a workdir that holds a run of another config
  if args.quick:
    config.pretrain.num_steps = 3
    config.pretrain.log_every = config.pretrain.checkpoint_every = 1
    config.targets = ml_collections.ConfigDict({"mnist5k_5-9": compare.targets["mnist5k_5-9"]})
    config.seeds = (0,)
    config.old_shots, config.new_shots = 2, 5
    config.lqf.steps = 5
    del config.methods["fd_lm_lam0_03"], config.methods["fd_lm_lam0_1"]
    config.certify = None  # tests/test_update_lqf.py checks `experiments.update_lqf.certify` directly
  return config
