"""Prefect flows, one per DVC stage: wiring only.

Each ``flows/<stage>.py`` loads its params sections, calls the tasks in
``tasks/<stage>.py`` and writes the outputs ``dvc.yaml`` declares. Run one
with ``python -m flows.<stage>``; ``dvc repro`` runs them all in order.
"""
