"""Timing shared by the latency benchmarks: interleaved repetitions, so a load change on a shared machine hits
every contender alike."""

from __future__ import annotations

import random
import statistics
import time


def interleaved(jobs: dict, runs: int, warmup: int, seed: int = 0) -> dict:
    """Median seconds per job; every repetition runs all jobs once, in a fresh random order."""
    for _ in range(warmup):
        for job in jobs.values():
            job()
    times: dict = {name: [] for name in jobs}
    order = list(jobs)
    rng = random.Random(seed)
    for _ in range(runs):
        rng.shuffle(order)
        for name in order:
            start = time.perf_counter()
            jobs[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
