"""Training: the teacher (train stage) and the student (distill stage) on one engine.

``engine`` holds ``fit``; ``resume`` its ``TrainState``, saved after every
epoch; ``distributed`` what changes under torchrun; ``device_data`` batches
held and augmented on the device; ``losses`` the objectives. ``train`` and
``distill`` are the two stages.
"""
