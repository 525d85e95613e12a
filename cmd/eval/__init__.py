"""Evaluation on frozen features: extraction, k-NN, linear probing, retrieval, part localisation;
and the supervised reference of a backbone (what labels reach in the same budget).

``eval`` knows backbones only through a callable: [`extract_features`][cmd.eval.extract_features] runs ``model(images)``
(or a ``forward(model, images)`` of your choice) over a loader, and the evaluators work on the
resulting feature tensors.

Example:
    >>> from cmd.eval import KNNClassifier, extract_features  # doctest: +SKIP
    >>> train_x, train_y = extract_features(teacher_backbone, train_loader)  # doctest: +SKIP
    >>> test_x, test_y = extract_features(teacher_backbone, test_loader)  # doctest: +SKIP
    >>> KNNClassifier(k=(10, 20)).fit(train_x, train_y).evaluate(test_x, test_y)[20]["top1"]  # doctest: +SKIP
"""

from __future__ import annotations

from .features import extract_features, loader_batch_indices
from .knn import KNNClassifier
from .label_fraction import class_balanced_split, class_balanced_subset
from .linear import LinearProbe, default_lr_sweep, probe_accuracy, train_linear_probe
from .localisation import part_token_mask, part_weight_mass, pointing_game, top_k_part_iou
from .retrieval import average_precision, fine_grained_retrieval_split, retrieval_metrics
from .search import InnerProductSearch, choose_backend
from .supervised import SupervisedResult, gap_closed, train_supervised

__all__ = [
    "extract_features",
    "loader_batch_indices",
    "KNNClassifier",
    "class_balanced_subset",
    "class_balanced_split",
    "LinearProbe",
    "train_linear_probe",
    "probe_accuracy",
    "default_lr_sweep",
    "part_weight_mass",
    "part_token_mask",
    "pointing_game",
    "top_k_part_iou",
    "retrieval_metrics",
    "fine_grained_retrieval_split",
    "average_precision",
    "InnerProductSearch",
    "choose_backend",
    "train_supervised",
    "SupervisedResult",
    "gap_closed",
]
