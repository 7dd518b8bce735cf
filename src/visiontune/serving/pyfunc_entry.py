"""The MLflow model's code (MLflow's models-from-code): ``mlflow.pyfunc.load_model`` runs this
file to build the model, so nothing is unpickled. visiontune travels in the model's code path."""

from mlflow.models import set_model

from visiontune.serving.mlflow_model import ImageClassifierModel

set_model(ImageClassifierModel())
