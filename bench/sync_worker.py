"""The body of one process of the multi-process sync benchmark (importable, for spawn)."""

from __future__ import annotations

import time
from typing import Any

from redcredit import RedCredit, Settings


def sync_worker(
    settings_json: str, runs: int, seconds: float, max_ops: int, barrier: Any, queue: Any
) -> None:
    settings = Settings.model_validate_json(settings_json)
    with RedCredit(settings=settings) as rc:
        rc.spend("hot", cost=1)
        for _ in range(runs):
            barrier.wait()
            latencies: list[float] = []
            c0 = time.process_time()
            began = time.perf_counter()
            stop = began + seconds
            while len(latencies) < max_ops and (start := time.perf_counter()) < stop:
                rc.spend("hot", cost=1)
                latencies.append(time.perf_counter() - start)
            queue.put(
                (len(latencies), time.perf_counter() - began, latencies, time.process_time() - c0)
            )
