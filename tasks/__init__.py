"""visionpipe's work, in sub-packages that follow the pipeline, with the shared pieces beside them.

``data/`` (prepare, resample), ``training/`` (train, distill), ``export/``
(quantize), ``evaluation/`` (evaluate) and ``serving/`` (predict, the HTTP
server, the model registry); ``params``, ``layout``, ``artifacts``,
``tracking``, ``models``, ``checkpoints``, ``transforms`` and ``inference``
are used by several of them. Every function
here is a plain typed function; the stage-level ones are decorated thinly
with ``@stage_task`` so Prefect records them, and tests call their ``.fn``
(the undecorated core) directly.
"""
