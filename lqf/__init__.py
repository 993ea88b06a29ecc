"""LQF: linearize a network around its weights w0 and fine-tune the linear model, exactly and fast.

The method imports only jax, flax, optax and numpy; the runtime that runs experiments (loop, checkpoints,
metrics, CLI, config helpers) is `lqf.runtime`, which the method never imports. The names below are the
public API (README, "Using LQF from Python"); one function is reached through its module because the
module has its name: `lqf.linearize.linearize`.
"""

from lqf.fit import FitOptions, ImageStream, evaluate, fit_linearized, predict
from lqf.forget import Forgotten, forget_by_cg, forget_by_downdate
from lqf.guard import run_steps
from lqf.influence import (KernelFit, LOOCurve, RidgePath, empirical_ntk, influence_on_test, kernel_fit,
                           loo_predictions, ridge_path)
from lqf.kfac import KFACFactors, curvature_factors, kfac_inverse, kfac_precondition
from lqf.linearize import Features, Linearized, trainable_mask
from lqf.losses import WeightedTargets, one_hot_targets
from lqf.metric import Metric
from lqf.mislabel import LabelScores, label_scores
from lqf.ntk import ntk_approximation
from lqf.nystrom import NystromSketch, nystrom_precondition
from lqf.precision import exact
from lqf.preconditioners import Preconditioner, register
from lqf.solve import CGInfo, Certificate, certify, conjugate_gradient, solve_linearized
from lqf.stability import auto_learning_rate, largest_eigenvalue
from lqf.step_rules import quadratic_model_step
from lqf.task_arithmetic import TangentPath, add_task_vectors, choose_scale, tangent_path

__all__ = [
    "CGInfo", "Certificate", "Features", "FitOptions", "Forgotten", "ImageStream", "KFACFactors",
    "KernelFit", "LOOCurve", "LabelScores", "Linearized", "Metric", "NystromSketch", "RidgePath", "Preconditioner", "TangentPath", "WeightedTargets",
    "add_task_vectors", "auto_learning_rate", "certify", "choose_scale", "conjugate_gradient",
    "curvature_factors", "empirical_ntk", "evaluate", "exact", "fit_linearized", "forget_by_cg", "forget_by_downdate", "influence_on_test",
    "kernel_fit", "kfac_inverse", "kfac_precondition", "label_scores", "largest_eigenvalue",
    "loo_predictions", "ntk_approximation", "nystrom_precondition", "one_hot_targets", "predict",
    "quadratic_model_step", "register", "ridge_path", "run_steps", "solve_linearized", "tangent_path", "trainable_mask",
]
