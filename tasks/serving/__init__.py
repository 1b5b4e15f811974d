"""Serving: using the trained models, outside the DVC pipeline.

``predict`` labels image files with any variant, file or MLflow model
(``visionpipe predict``); ``server`` serves one over HTTP (``visionpipe
serve-model``); ``registry`` registers the variants in MLflow as models that
take image files (``pyfunc``) and moves the ``champion`` alias (``python -m
flows.retrain``).
"""
