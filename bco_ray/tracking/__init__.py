"""Stage 3: MLflow tracking. One run per job; the driver owns its lifecycle, rank 0 logs steps into it."""
