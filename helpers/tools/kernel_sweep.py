"""Thread sweep of the fused decoding step's INT4 kernel alone, for a machine without bigdl-llm.

    python -m helpers.tools.kernel_sweep [--shape 1b5] [--threads 1,2,4] [--tokens 1,8] [--rounds 7] [--json PATH]

It needs torch and a C compiler, not bigdl-llm: it builds rwkv4_decode.c with the build function the
runtime uses (helpers.runtime.fused_decode: the fastest build this CPU runs, or --fused-kernel's, with that
build's flags, not -march=native), fills one token's worth of sym_int4 matrices of the shape (every block
linear and the head) with random blocks, and for each thread count and number of tokens (1: a decoded token;
8: a batched step of 8 sequences) times the products over them all once, as a decoding step computes them,
in two ways:
- from memory (`kernel_ms`): the matrices one after another, as a step reads them;
- in cache (`in_cache_ms`): the same products in slices of rows that fit in a quarter of one instance of
  the last-level cache, each slice timed when it is already there. The sum is the kernel's own work with
  little wait for memory: when it is near the read bound, computing and reading must overlap well for a
  step to reach that bound.
Each is the faster of two timings. Beside them: the read bound (torch's read bandwidth with as many threads),
and for one token the multiply-add bound (the blocks' integer multiply-adds alone,
rwkv4_block_dots_per_second). The figures take turns within each of --rounds rounds; a record holds each
figure's rounds (`*_rounds`) and their median. Results for notebook 09 and docs/benchmarks.md, with their
provenance (helpers.measure.provenance).
"""
import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

from helpers.measure import provenance
from helpers.measure.bandwidth import last_level_caches, read_bandwidth_gbs
from helpers.measure.timing import seconds
from helpers.runtime import settings
from helpers.runtime.errors import one_line_errors
from helpers.runtime.cpu import cpu_info
from helpers.runtime.fused_decode import BLOCK, BLOCK_BYTES, load_library
from helpers.runtime.shapes import SHAPES, VOCAB_SIZE

SYM_INT4 = 0  # the kernel's format number (helpers.runtime.fused_decode.FORMATS)
SLICE_ROWS = 64  # a slice's rows are a multiple of this: whole groups of the kernel's rows
UNKNOWN_CACHE_BYTES = 8 << 20  # the last-level cache assumed where the system does not say
ROUND_FIGURES = ("kernel_ms", "in_cache_ms", "bound_ms", "multiply_add_bound_ms")  # each measured once a round


def random_int4(rows, cols, generator):
    """A sym_int4 matrix of random nibbles, every block scaled by 0.01."""
    blocks = torch.randint(0, 256, (rows, cols // BLOCK, BLOCK_BYTES[SYM_INT4]), dtype=torch.uint8, generator=generator)
    blocks[:, :, :2] = torch.tensor([0.01], dtype=torch.float16).view(torch.uint8)
    return blocks.reshape(-1)


def token_matrices(shape):
    """(weights, rows, cols) of every linear one decoded token reads."""
    layers, hidden = SHAPES[shape]
    per_layer = [(hidden, hidden)] * 5 + [(4 * hidden, hidden), (hidden, 4 * hidden)]
    generator = torch.Generator().manual_seed(0)
    return [(random_int4(rows, cols, generator), rows, cols) for rows, cols in per_layer * layers + [(VOCAB_SIZE, hidden)]]


def row_slices(matrices, budget_bytes):
    """(address, rows, cols) of consecutive row slices covering every matrix once, each within budget_bytes
    (or SLICE_ROWS rows where one row is wider than that)."""
    slices = []
    for weights, rows, cols in matrices:
        row_bytes = weights.numel() // rows
        step = max(SLICE_ROWS, budget_bytes // row_bytes // SLICE_ROWS * SLICE_ROWS)
        slices += [(weights.data_ptr() + first * row_bytes, min(step, rows - first), cols) for first in range(0, rows, step)]
    return slices


def sweep(shape, thread_counts, token_counts=(1,), rounds=7, kernel="auto", command="python -m helpers.tools.kernel_sweep"):
    try:
        native = load_library(kernel)
    except (RuntimeError, OSError) as error:
        return {"shape": shape, "error": f"the fused step cannot be built on this CPU ({cpu_info().model}): {error}"}
    matrices = token_matrices(shape)
    slices = row_slices(matrices, min(last_level_caches() or [UNKNOWN_CACHE_BYTES]) // 4)
    most = max(token_counts)
    inputs = {cols: torch.randn(most, cols) for _, _, cols in matrices}
    outputs = torch.empty((most + 7) // 8 * 8 * max(rows for _, rows, _ in matrices))  # room for the kernel's padding
    weight_bytes = sum(weights.numel() for weights, _, _ in matrices)

    def product(address, rows, cols, tokens, threads):
        if native.rwkv4_matmul(address, SYM_INT4, rows, cols, inputs[cols].data_ptr(), tokens, outputs.data_ptr(), threads):
            raise MemoryError("the kernel could not allocate its buffers")

    def from_memory_ms(tokens, threads):
        every_matrix = lambda: [product(w.data_ptr(), rows, cols, tokens, threads) for w, rows, cols in matrices]  # noqa: E731
        return min(seconds(every_matrix) for _ in range(2)) * 1000

    def in_cache_ms(tokens, threads):
        total = 0.0
        for piece in slices:
            product(*piece, tokens, threads)  # brings the slice into the cache
            total += min(seconds(lambda: product(*piece, tokens, threads)) for _ in range(2))
        return total * 1000

    def multiply_add_bound_ms(threads):
        return weight_bytes / BLOCK_BYTES[SYM_INT4] / native.rwkv4_block_dots_per_second(SYM_INT4, threads) * 1000

    configurations = [(threads, tokens) for threads in thread_counts for tokens in token_counts]
    rounds_of = {configuration: {key: [] for key in ROUND_FIGURES} for configuration in configurations}
    for threads, tokens in configurations:
        from_memory_ms(tokens, threads)  # warm-up: the kernel's buffers, the threads
    bandwidths = []  # GB/s, every sample: the run's provenance
    for _ in range(rounds):
        for threads, tokens in configurations:
            figures = rounds_of[threads, tokens]
            bandwidths.append(read_bandwidth_gbs(threads, repeats=3))
            figures["bound_ms"].append(weight_bytes / (bandwidths[-1] * 1e9) * 1000)
            if tokens == 1:
                figures["multiply_add_bound_ms"].append(multiply_add_bound_ms(threads))
            figures["kernel_ms"].append(from_memory_ms(tokens, threads))
            figures["in_cache_ms"].append(in_cache_ms(tokens, threads))
    records = []
    for (threads, tokens), figures in rounds_of.items():
        medians = {key: statistics.median(values) for key, values in figures.items() if values}
        print(json.dumps({"threads": threads, "tokens": tokens, **medians}), flush=True)
        records.append({"threads": threads, "tokens": tokens, **medians,
                        **{f"{key}_rounds": values for key, values in figures.items() if values}})
    made = provenance.stamp("kernel", command, max(thread_counts), bandwidths)
    return {"provenance": made, "shape": shape, "weight_bytes": weight_bytes, "rounds": rounds, "records": records}


def counts(text):
    """Comma-separated numbers of 1 or more (an argparse type)."""
    try:
        values = [int(n) for n in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers of 1 or more, separated by commas")
    return values


def count(text):
    """One number of 1 or more (an argparse type)."""
    values = counts(text)
    if len(values) > 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give one number")
    return values[0]


@one_line_errors
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1b5", choices=list(SHAPES))
    parser.add_argument("--threads", type=counts, help="comma-separated thread counts (default: 1, 2, 4, ... all CPUs)")
    parser.add_argument("--tokens", type=counts, default=[1], help="comma-separated tokens per product (default: 1)")
    parser.add_argument("--rounds", type=count, default=7, help="rounds (default: 7)")
    parser.add_argument("--json", type=Path)
    settings.add_flags(parser, "fused_kernel")
    args = parser.parse_args(argv)
    kernel = settings.from_flags(args).fused_kernel
    cpus = os.cpu_count()
    thread_counts = args.threads or sorted({min(2**i, cpus) for i in range(cpus.bit_length() + 1)})
    result = sweep(args.shape, thread_counts, args.tokens, args.rounds, kernel,
                   provenance.command_line("helpers.tools.kernel_sweep", argv))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
