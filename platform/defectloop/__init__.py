"""defectloop: active-learning backend for visual defect labeling.

The core library (features, memory, models, data, metrics, store) is pure torch/numpy; Ray,
FastAPI and Label Studio glue lives in ``defectloop.workers``, ``defectloop.serve`` and
``defectloop.labeling``.
"""

__version__ = "0.1.0"
