"""The training loop, evaluation and checkpoints (no Ray, no MLflow: those plug in as callbacks)."""
