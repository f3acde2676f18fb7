"""The MLflow registry side: the pyfunc model that a registered version serves."""
