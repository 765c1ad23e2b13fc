"""Thread sweep of the fused decoding step's INT4 kernel alone, for a machine without bigdl-llm.

    python -m helpers.tools.kernel_sweep [--shape 1b5] [--threads 1,2,4] [--json PATH]

It needs torch and a C compiler, not bigdl-llm: it builds rwkv4_decode.c with the build function the
runtime uses (helpers.runtime.fused_decode: the fastest build this CPU runs, or --fused-kernel's, with that
build's flags, not -march=native), fills one token's worth of sym_int4 matrices of the shape (every block
linear and the head) with random blocks, and for each thread count times reading them all once, as a
decoding step does, next to torch's read bandwidth with as many threads. Results for notebook 09, with
their provenance (helpers.measure.provenance).
"""
import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

from helpers.measure import provenance
from helpers.measure.bandwidth import read_bandwidth_gbs
from helpers.measure.timing import seconds
from helpers.runtime import settings
from helpers.runtime.errors import one_line_errors
from helpers.runtime.cpu import cpu_info
from helpers.runtime.fused_decode import BLOCK, BLOCK_BYTES, load_library
from helpers.runtime.shapes import SHAPES, VOCAB_SIZE

SYM_INT4 = 0  # the kernel's format number (helpers.runtime.fused_decode.FORMATS)


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


def sweep(shape, thread_counts, kernel="auto", command="python -m helpers.tools.kernel_sweep"):
    try:
        native = load_library(kernel)
    except (RuntimeError, OSError) as error:
        return {"shape": shape, "error": f"the fused step cannot be built on this CPU ({cpu_info().model}): {error}"}
    matrices = token_matrices(shape)
    inputs = {cols: torch.randn(cols) for _, _, cols in matrices}
    outputs = {rows: torch.empty(rows) for _, rows, _ in matrices}
    weight_bytes = sum(weights.numel() for weights, _, _ in matrices)

    def one_token(threads):
        for weights, rows, cols in matrices:
            if native.rwkv4_matmul(weights.data_ptr(), SYM_INT4, rows, cols, inputs[cols].data_ptr(), 1,
                                   outputs[rows].data_ptr(), threads):
                raise MemoryError("the kernel could not allocate its buffers")

    records = []
    for threads in thread_counts:
        bandwidth = read_bandwidth_gbs(threads)
        one_token(threads)  # warm-up
        milliseconds = statistics.median(seconds(lambda: one_token(threads)) for _ in range(7)) * 1000
        records.append({"threads": threads, "kernel_ms": milliseconds, "bandwidth_gbs": bandwidth,
                        "bound_ms": weight_bytes / (bandwidth * 1e9) * 1000})
        print(json.dumps(records[-1]), flush=True)
    made = provenance.stamp("kernel", command, max(thread_counts), [record["bandwidth_gbs"] for record in records])
    return {"provenance": made, "shape": shape, "weight_bytes": weight_bytes, "records": records}


@one_line_errors
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1b5", choices=list(SHAPES))
    parser.add_argument("--threads", default="", help="comma-separated thread counts (default: 1, 2, 4, ... all CPUs)")
    parser.add_argument("--json", type=Path)
    settings.add_flags(parser, "fused_kernel")
    args = parser.parse_args(argv)
    kernel = settings.from_flags(args).fused_kernel
    cpus = os.cpu_count()
    counts = [int(n) for n in args.threads.split(",")] if args.threads else sorted(
        {min(2**i, cpus) for i in range(cpus.bit_length() + 1)})
    result = sweep(args.shape, counts, kernel, provenance.command_line("helpers.tools.kernel_sweep", argv))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
