"""The machine's read bandwidth: what a decoding step's time is judged against."""
import time

from helpers.runtime.memory import GIB


def read_bandwidth_gbs(threads, size_bytes=GIB, repeats=10):
    """Read bandwidth in GB/s: the best of a sum and of an fp32 matrix-vector product over 1 GiB."""
    import torch

    torch.set_num_threads(threads)
    matrix = torch.ones(size_bytes // 4 // 4096, 4096)
    vector = torch.ones(4096)
    best = min(min(_timed(matrix.sum), _timed(lambda: torch.mv(matrix, vector))) for _ in range(repeats))
    return size_bytes / best / 1e9


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
