"""The machine's read bandwidth: what a decoding step's time is judged against."""
from helpers.measure.timing import seconds
from helpers.runtime.memory import GIB


def read_bandwidth_gbs(threads, size_bytes=GIB, repeats=10):
    """Read bandwidth in GB/s: the best of a sum and of an fp32 matrix-vector product over 1 GiB."""
    import torch

    torch.set_num_threads(threads)
    matrix = torch.ones(size_bytes // 4 // 4096, 4096)
    vector = torch.ones(4096)
    best = min(min(seconds(matrix.sum), seconds(lambda: torch.mv(matrix, vector))) for _ in range(repeats))
    return size_bytes / best / 1e9
