"""visionpipe's work: one module per DVC stage plus the shared pieces they use.

Every function here is a plain typed function; the stage-level ones are
decorated thinly with ``@stage_task`` so Prefect records them, and tests call
their ``.fn`` (the undecorated core) directly.
"""
