"""The one place tasks meet Prefect.

``stage_task`` is Prefect's ``@task`` with result caching and persistence off:
DVC already decides what reruns and caches the outputs, so a second cache in
Prefect would only hash large arrays for nothing.
"""

from __future__ import annotations

from functools import partial

from prefect import task
from prefect.cache_policies import NO_CACHE

stage_task = partial(task, cache_policy=NO_CACHE, persist_result=False)
