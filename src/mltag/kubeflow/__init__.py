"""The Kubeflow Pipelines side of mltag: components, the DAG, compile/run/submit.

Importing this package needs ``kfp`` and ``kfp-kubernetes`` (the ``[kubeflow]`` extra).
"""
