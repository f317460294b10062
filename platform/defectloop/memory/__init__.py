"""Memory: coreset sampling, nearest-neighbour indexes, normal/abnormal banks."""

from defectloop.memory.banks import AbnormalBank, NormalBank, NormalEvidence, Provenance
from defectloop.memory.coreset import (
    CoresetSampler,
    KCenterGreedy,
    RandomSampler,
    extend_farthest,
    target_size,
)
from defectloop.memory.nn_index import (
    EXACT_MAX,
    ExactIndex,
    IndexFactory,
    IVFIndex,
    NNIndex,
    build_index,
    knn,
    nearer_columns,
)

__all__ = ["EXACT_MAX", "AbnormalBank", "CoresetSampler", "ExactIndex", "IVFIndex", "IndexFactory", "KCenterGreedy", "NNIndex", "NormalBank",
           "NormalEvidence", "Provenance", "RandomSampler", "build_index", "extend_farthest", "knn", "nearer_columns", "target_size"]
