"""Training: the teacher (train stage) and the student (distill stage) on one engine.

``train`` and ``distill`` are the two stages. They start from ``inputs``
(data, batches, network, loss) and end in ``outputs`` (checkpoint, metrics,
curve). In between, ``engine.fit`` runs the loop, with ``resume``'s
``TrainState`` saved after every epoch; ``loaders`` and ``device_data`` make
the batches, ``hardware`` picks device and precision, ``distributed`` is what
changes under torchrun, and ``losses`` holds the objectives.
"""
