"""The file MLflow runs to load a visionpipe model version (a model from code).

``registry.log_image_model`` logs it as the model's ``python_model``: MLflow
copies it into the model and runs it at load time, after putting the model's
``code/`` folder on ``sys.path``, where ``visionpipe_model`` is the copy of
``tasks/serving/pyfunc.py`` and what it imports. It is never imported as part
of ``tasks``: the model must load where this repository cannot be imported.
"""

from mlflow.models import set_model
from visionpipe_model.serving.pyfunc import ImageModel

set_model(ImageModel())
