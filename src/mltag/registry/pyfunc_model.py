"""MLflow "models from code" entry: register logs this file, not a pickled object.

Loading the model runs this file with mltag on the path (the version's code_paths), so
nothing is cloudpickled and a newer Python or library version can still load it.
"""

from mlflow.models import set_model

from mltag.registry.pyfunc import MltagPyfunc

set_model(MltagPyfunc())
