"""Ray Serve scorer: HTTP scoring API and Label Studio ML-backend routes (import as ``defectloop.serve``)."""
