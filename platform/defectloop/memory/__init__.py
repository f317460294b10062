"""Memory: coreset sampling, nearest-neighbour indexes, normal/abnormal banks."""

from defectloop.memory.banks import AbnormalBank, NormalBank, NormalEvidence, Provenance
from defectloop.memory.coreset import (
    CoresetSampler,
    KCenterGreedy,
    RandomSampler,
    extend_farthest,
    target_size,
)
from defectloop.memory.nn_index import ExactIndex, IndexFactory, IVFIndex, NNIndex, build_index, knn

__all__ = ["AbnormalBank", "CoresetSampler", "ExactIndex", "IVFIndex", "IndexFactory", "KCenterGreedy", "NNIndex", "NormalBank",
           "NormalEvidence", "Provenance", "RandomSampler", "build_index", "extend_farthest", "knn", "target_size"]
