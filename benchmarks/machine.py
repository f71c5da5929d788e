"""The machine's memory bandwidth of the moment, read beside the benchmarks' timed runs: on this
project's cloud machines it moves between a low and a high regime over minutes, so a ratio is only
meaningful between runs taken at the same reading."""

from __future__ import annotations

import time

import torch


def read_bandwidth(seconds: float = 12.0) -> tuple[float, float]:
    """(burst, sustained) bytes per second that a full-width reduction reads from memory.

    The buffer (512 MiB) is far larger than any cache. On this project's cloud machines the first
    few seconds of heavy reading after a pause run at up to twice the rate that holds after them,
    so the reduction repeats for `seconds`: burst is the best reading of the first two seconds,
    sustained the median of the second half. Decoding reads continuously, so the roofline uses
    the sustained rate."""
    buf = torch.ones(2**27, dtype=torch.float32)
    buf.sum()
    start, readings = time.perf_counter(), []
    while time.perf_counter() - start < seconds:
        readings.append((time.perf_counter() - start, buf.numel() * 4 / timed(buf.sum)))
    burst = max(rate for t, rate in readings if t < 2.0)
    later = sorted(rate for t, rate in readings if t >= seconds / 2)
    return burst, later[len(later) // 2]


def bandwidth_now(seconds: float = 1.0) -> float:
    """The best reduction rate over `seconds`: the bandwidth of the moment, read beside each timed
    run, since the machine moves between a low and a high regime (about 37 and 64 GB/s here) over
    minutes."""
    buf = torch.ones(2**27, dtype=torch.float32)
    start, best = time.perf_counter(), 0.0
    while time.perf_counter() - start < seconds:
        best = max(best, buf.numel() * 4 / timed(buf.sum))
    return best


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
