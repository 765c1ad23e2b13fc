"""The machine's read bandwidth: what a decoding step's time is judged against."""
from pathlib import Path

from helpers.measure.timing import seconds
from helpers.runtime.memory import GIB

CPU_DIR = Path("/sys/devices/system/cpu")
MIN_BUFFER, MAX_BUFFER = GIB // 4, GIB
CACHE_MULTIPLE = 8  # a buffer this many times the last-level cache is read from memory, not from the cache


def last_level_caches(cpu_dir=CPU_DIR):
    """The bytes of each instance of the last-level cache (Linux's sysfs); [] where they are not known."""
    sizes = {}  # (level, CPUs sharing it): bytes
    for index in cpu_dir.glob("cpu[0-9]*/cache/index[0-9]*"):
        try:
            level, size, shared = ((index / name).read_text().strip() for name in ("level", "size", "shared_cpu_list"))
            sizes[int(level), shared] = int(size.removesuffix("K")) * 1024 if size.endswith("K") else int(size)
        except (OSError, ValueError):
            continue
    top = max((level for level, _ in sizes), default=None)
    return [size for (level, _), size in sizes.items() if level == top]


def last_level_cache_bytes(cpu_dir=CPU_DIR):
    """The last-level cache of every instance together, or 0 where it is not known."""
    return sum(last_level_caches(cpu_dir))


def buffer_bytes():
    """The buffer read: CACHE_MULTIPLE times the last-level cache, within 256 MiB and 1 GiB."""
    return min(MAX_BUFFER, max(MIN_BUFFER, CACHE_MULTIPLE * last_level_cache_bytes()))


def read_bandwidth_gbs(threads, size_bytes=None, repeats=10):
    """Read bandwidth in GB/s: the best of a sum and of an fp32 matrix-vector product over a buffer of
    size_bytes (default: buffer_bytes())."""
    import torch

    size_bytes = size_bytes or buffer_bytes()
    torch.set_num_threads(threads)
    matrix = torch.ones(size_bytes // 4 // 4096, 4096)
    vector = torch.ones(4096)
    best = min(min(seconds(matrix.sum), seconds(lambda: torch.mv(matrix, vector))) for _ in range(repeats))
    return size_bytes / best / 1e9
