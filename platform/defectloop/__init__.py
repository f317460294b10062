"""defectloop: active-learning backend for visual defect labeling.

The core library (features, memory, models, data, metrics, store) is pure torch/numpy; Ray,
FastAPI and Label Studio glue lives in ``defectloop.workers``, ``defectloop.serve`` and
``defectloop.labeling``.
"""

import os

# PyTorch's CPU allocator backs its blocks of 2 MB and more with transparent huge pages when this
# is set. Scoring allocates tens of MB of activations and distances per batch, and each fresh
# block is paged in again: on the dev VM the backbone ran 2.5x faster with it (32 tiles of 256
# px: 375 -> 150 ms), DMAD's whole scoring 1.8x (480 -> 271 ms). Torch reads it once, at its first
# allocation, so it is set here, before any defectloop module imports torch; processes started
# from this one (Ray workers, Serve replicas) inherit it. THP_MEM_ALLOC_ENABLE=0 turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
