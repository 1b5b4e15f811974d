"""Evaluation: the three variants scored, timed and reported on the test split.

``evaluate`` is the stage; ``scoring`` the metrics and paired comparisons,
``latency`` the timing, ``robustness`` corrupted and adversarial copies of the
test split, ``gradcam`` saliency images.
"""
