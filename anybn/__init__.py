"""anybn: one batch normalization for every array library, written against the array API.

Functional core: :func:`batch_norm_train`, :func:`batch_norm_backward`,
:func:`batch_norm_eval`, :func:`batch_norm_fixed` (given statistics, with a backward) and
:func:`update_running_stats`. Stateful layer: :class:`BatchNorm`. Population statistics for
inference (Ioffe & Szegedy 2015, Algorithm 2): :class:`PopulationStats`.
"""

from .functional import (
    BatchNormSaved,
    batch_norm_backward,
    batch_norm_eval,
    batch_norm_fixed,
    batch_norm_train,
    update_running_stats,
)
from .fold import fold_into_conv, fold_into_linear
from .layer import BatchNorm
from .population import PopulationStats
from .recurrent import RecurrentBatchNorm
from .renorm import BatchRenorm, batch_renorm_train, renorm_limits

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "BatchNormSaved",
    "BatchRenorm",
    "PopulationStats",
    "RecurrentBatchNorm",
    "batch_norm_backward",
    "batch_norm_eval",
    "batch_norm_fixed",
    "batch_norm_train",
    "batch_renorm_train",
    "fold_into_conv",
    "fold_into_linear",
    "renorm_limits",
    "update_running_stats",
]
