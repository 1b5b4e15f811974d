"""Serving: using the trained models, outside the DVC pipeline.

``predict`` labels image files with any variant, file or MLflow model
(``visionpipe predict``); ``registry`` registers the variants in MLflow and
moves the ``champion`` alias (``python -m flows.retrain``).
"""
