r"""The demo: linear (LQF) vs nonlinear fine-tuning from a digits-0–4 source to new digits and a new domain.

  python -m experiments.compare --config configs/compare_mnist.py --workdir /tmp/lqf_demo

Source: a leaky-ReLU ResNet-8 pretrained on `mnist5k` digits 0–4 (and a ReLU twin for the `lqf_relu`
ablation), trained first if `<workdir>/source_*` holds no checkpoint. Targets: digits 5–9, which the source
never saw, of `mnist5k` (new classes) and of `uci_digits` (new classes in a new domain: 8×8 scans → 28×28).
Shots per class 1, 5, 10 and 25 × LQF, its ablations, the linear probe and nonlinear fine-tuning of the same
layers × 3 seeds. Writes results.json, results.md and accuracy_vs_shots.png.

Arguments: ``full`` (adds all-data training sets and nonlinear fine-tuning of every layer: ~20 min on 2 CPU
cores, the README's demo stays ≤ 5 min without them), ``quick`` (shots 5 and 25, one seed: a smoke run),
``seeds=N``, ``linearize=stage3`` (the linearized tail: ``stage3`` = last stage + head, ``stage2`` = the
last two stages + head, ``all`` = every layer), ``relu_ablation`` (only ``lqf`` and ``lqf_relu``, the
leaky and the ReLU source linearized the same way, at 1, 5 and 25 shots: where does leaky ReLU help?).
``model=vit`` (the source is a small leaky-ReLU Vision Transformer, `lqf.models.vit`, pretrained 800 steps;
methods lqf, nonlinear and linear_probe; ``gelu``: its MLPs use GELU; ``linearize=block4`` = the last block, the final LayerNorm and the head,
``block3`` = the last two blocks + …, ``all``). The README's tables come from ``seeds=10``; the ReLU ablation from
``relu_ablation,seeds=10,linearize=stage2`` and ``...,linearize=all`` (`results/compare_mnist_relu/`).
``certified`` (the README's "Which model is certified"; ``certified,seeds=10``, `results/compare_mnist_certified/`):
LQF's certified optimum δ* of ridge in K-FAC's metric (``lqf``, the default, `lqf.metric`) against the
40-step K-FAC fit (``lqf_steps``, the default before it) and δ* of the Euclidean objective
(``lqf_euclidean``), each certified one at λ = 1e-3 and with λ by exact leave-one-out (``…_loo``).
``tuned`` (the README's "Tuned, over several sources"; `results/compare_mnist_tuned/`): every method at
its best setting chosen on a validation split (``validation=50`` images per class carved out of each
target's training data, disjoint from every shot draw and from the test split), out of the same number of
settings each (6): LQF and its ReLU twin over λ × μ (``weight_decay`` × ``metric_damping``; the target
scale s is not tuned: head, Jacobian and K-FAC factors scale with it, so the objective scales by s² up to
μ), nonlinear
fine-tuning over learning rate × steps, the probe over its ridge λ; ``sources=5`` independently
pretrained sources per activation (pretraining seeds 0…4) × ``draws=2`` k-shot draws per source, with
two-level intervals over sources (`experiments.stats.clustered_interval`).
Expected: see the README's results section (measured numbers, with their wall time on a 2-core CPU).
"""

import ml_collections

from lqf.runtime import config_util

# The linearized (trainable) tail of the source network, by ``linearize``: ResNet-8, ViT.
LINEARIZED = {"stage3": "^(stage3|head)/", "stage2": "^(stage2|stage3|head)/", "all": "all"}
LINEARIZED_VIT = {"block4": "^(block4|norm|head)/", "block3": "^(block3|block4|norm|head)/", "all": "all"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_util.parse_arg(arg, quick=False, full=False, seeds=3, linearize="", relu_ablation=False,
                               model="resnet8", gelu=False, certified=False, tuned=False, sources=5,
                               draws=2, validation=50)
  if args.model not in ("resnet8", "vit"):
    raise ValueError(f"config argument model={args.model!r} is unknown: use 'resnet8' or 'vit'.")
  vit = args.model == "vit"
  linearized = LINEARIZED_VIT if vit else LINEARIZED
  linearize = args.linearize or next(iter(linearized))
  if linearize not in linearized:
    raise ValueError(f"config argument linearize={args.linearize!r} is unknown for {args.model}: use one of "
                     f"{sorted(linearized)}.")
  finetune = config_util.load_sibling(__file__, "finetune_mnist")
  config = ml_collections.ConfigDict()
  # 100 steps instead of pretrain_mnist.py's 150 keeps the demo within 5 minutes (98 % at step 105).
  if vit:
    config.pretrain = config_util.load_sibling(__file__, "pretrain_mnist",
                                               "model=vit,steps=800,lr=0.05" + ",gelu" * args.gelu)
  else:
    config.pretrain = config_util.load_sibling(__file__, "pretrain_mnist", "steps=100")
    config.pretrain_relu = config_util.load_sibling(__file__, "pretrain_mnist", "relu,steps=100")
  config.targets = ml_collections.ConfigDict({
      "mnist5k_5-9": finetune.data, "uci_digits_5-9": config_util.load_sibling(
          __file__, "finetune_mnist", "target=uci_digits").data})
  config.shots = (5, 25) if args.quick else (1, 5, 10, 25, 0) if args.full else (1, 5, 10, 25)  # 0 = all
  config.seeds = (0,) if args.quick else tuple(range(args.seeds))
  config.methods = ("lqf", "nonlinear", "linear_probe", "lqf_relu", "lqf_ce", "lqf_no_kfac")
  if args.full:
    config.methods += ("nonlinear_all",)
  if vit:
    config.methods = ("lqf", "nonlinear", "linear_probe")
  config.lqf = finetune.lqf
  config.lqf.trainable = linearized[linearize]
  if args.certified:
    config.methods = ("lqf", "lqf_steps", "lqf_loo", "lqf_euclidean", "lqf_euclidean_loo")
  if args.relu_ablation:
    config.methods = ("lqf", "lqf_relu")
    config.shots = (1, 5, 25)
  config.nonlinear = finetune.nonlinear
  if args.tuned:
    config.methods = ("lqf", "lqf_relu", "nonlinear", "linear_probe")
    config.sources = args.sources
    config.seeds = (0,) if args.quick else tuple(range(args.draws))
    for target in config.targets.values():
      target.validation_per_class = args.validation
    # In K-FAC's metric λ shrinks δ by ≈ 1/(1 + λ) along the data (M ≈ the curvature there), so λ ≤ 1e-2
    # changes nothing (measured: identical accuracies at 1e-4, 1e-3, 1e-2); the grid spans 1e-3 … 10.
    lqf_grid = {"weight_decay": (1e-3, 1e-1, 10.0), "metric_damping": (1e-3, 1e-2)}
    config.tuning = ml_collections.ConfigDict({
        "lqf": lqf_grid, "lqf_relu": lqf_grid,
        "nonlinear": {"learning_rate": (3e-4, 1e-3, 3e-3), "steps": (100, 200)},
        "linear_probe": {"weight_decay": (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)}})
  config.overwrite = False  # True: discard the rows of an earlier sweep with another config in this workdir
  return config
