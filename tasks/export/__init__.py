"""Export: a checkpoint to ONNX, and the student to int8 (the quantize stage).

``onnx_io`` exports checkpoints and runs ONNX models (used by quantize, evaluate,
predict and the registry); ``quantize`` is the stage, with ``qat`` for
quantization-aware fine-tuning when post-training quantization loses too much.
"""
