"""compat: pure JAX functions for graceful model updates (BCT, PC training, flips, retrieval).

The studies that use them live in ``experiments/``.

Metrics in `compat.metrics`, losses in `compat.losses`, logit ensembles in `compat.ensembles`,
seed selection in `compat.selection`; the public names are re-exported here.
"""

from compat.ensembles import ensemble_logits, ensemble_predict
from compat.losses import (FD_LM_REDUCTIONS, bct_influence_loss, bct_pseudo_classifier, cross_entropy,
                           fd_lm_targets, focal_distillation_kl, focal_distillation_lm, focal_weights,
                           knowledge_distillation, l2_embedding_loss, logit_difference_inhibition)
from compat.metrics import (compatibility_criterion, error_rate, flip_summary,
                            negative_flip_impact, negative_flip_rate, positive_flip_rate,
                            relative_negative_flip_rate, retrieval_map, retrieval_top1, update_gain)
from compat.selection import SELECTION_CRITERIA, select_seed, split_heldout

__all__ = ["FD_LM_REDUCTIONS", "SELECTION_CRITERIA", "bct_influence_loss",
           "bct_pseudo_classifier", "compatibility_criterion", "cross_entropy",
           "ensemble_logits", "ensemble_predict", "error_rate", "fd_lm_targets", "flip_summary",
           "focal_distillation_kl", "focal_distillation_lm", "focal_weights",
           "knowledge_distillation", "l2_embedding_loss", "logit_difference_inhibition",
           "negative_flip_impact", "negative_flip_rate", "positive_flip_rate",
           "relative_negative_flip_rate", "retrieval_map", "retrieval_top1", "select_seed",
           "split_heldout", "update_gain"]
