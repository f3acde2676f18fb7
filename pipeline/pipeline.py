"""Entry point kept at the top level: the pipeline lives in ``mltag.kubeflow.pipeline``.

``python pipeline/pipeline.py [params.yaml]`` compiles ``pipeline/pipeline.yaml`` like
``mltag pipeline compile``; the compiled YAML beside this file is the committed one.
"""

import sys

from mltag.config import load_params
from mltag.kubeflow.run import compile_pipeline

if __name__ == "__main__":
    print(compile_pipeline(params=load_params(sys.argv[1] if len(sys.argv) > 1 else None)))
