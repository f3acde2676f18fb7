"""MLflow tracking: URI rules, run references, the model download cache and the helper process."""
