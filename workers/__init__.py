"""Ray Train workers and the retraining job (import as ``defectloop.workers``)."""
