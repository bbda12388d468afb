"""Teacher-guided one-shot unstructured pruning (docs/DESIGN.md §3).

The pipeline, in five calls::

    from s2h import unstructured as oneshot
    oneshot.distill(student, teacher, train_loader, epochs=10, alpha=0.5, temperature=4.0)
    scores = oneshot.importance(student, teacher, train_loader, alpha=0.5, temperature=4.0, batches=16)
    masks = oneshot.prune(student, scores, sparsity=0.9)           # zeroes the pruned weights
    oneshot.retrain(student, masks, train_loader, epochs=5, teacher=teacher, alpha=0.5)
    oneshot.save_pruned("runs/x/s0.9", student, masks, spec={...})  # state_dict + masks, no pickled modules

Modules, in the method's order: :mod:`.loss` (CA-KLD + CE), :mod:`.scoring` (importance),
:mod:`.pruning` (prunable weights, the global threshold), :mod:`.retraining` (teacher,
distillation, fixed-mask retraining), :mod:`.io` (files). Module names differ from the functions
they hold, so that the functions re-exported here never shadow a module. The command line is
:mod:`s2h.cli.oneshot`; evaluation and BatchNorm recalibration are :mod:`s2h.engine`'s.
"""
from ..engine.evaluation import evaluate, recalibrate_bn
from .scoring import IMPORTANCE_METHODS, compute_importance, importance, magnitude_importance
from .io import FORMAT, load_pruned, save_pruned
from .loss import ca_kld, total_loss
from .pruning import DEFAULT_EXCLUDE, PRUNABLE_TYPES, apply_masks, prunable_weights, prune, sparsity_report
from .retraining import distill, retrain, train_cross_entropy

__all__ = [
    "DEFAULT_EXCLUDE", "FORMAT", "IMPORTANCE_METHODS", "PRUNABLE_TYPES",
    "ca_kld", "total_loss", "prunable_weights", "distill", "train_cross_entropy", "importance",
    "magnitude_importance", "compute_importance", "prune", "apply_masks", "retrain", "evaluate", "recalibrate_bn",
    "sparsity_report", "save_pruned", "load_pruned",
]
