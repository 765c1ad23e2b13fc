"""Thread sweep of the fused decoding step's INT4 kernel alone, for a machine without this project's stack.

    python helpers/kernel_sweep.py [--shape 1b5] [--json PATH]

Run it as a file, not with -m: it needs only torch and a C compiler, not bigdl-llm. It compiles
rwkv4_decode.c, fills one token's worth of sym_int4 matrices of the shape (every block linear and the
head) with random blocks, and for each thread count times reading them all once, as a decoding step
does, next to torch's read bandwidth with as many threads. Results for notebook 04, with their provenance
as helpers.provenance writes it (that module needs bigdl-llm, so the few lines are repeated here).
"""
import argparse
import ctypes
import datetime
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "runtime" / "rwkv4_decode.c"
BLOCK, BLOCK_BYTES = 64, 34  # sym_int4
SYM_INT4 = 0  # the kernel's format number
# (layers, hidden) of the RWKV-4 World shapes; the feed-forward is 4x hidden, the vocabulary 65536.
SHAPES = {"1b5": (24, 2048), "3b": (32, 2560), "7b": (32, 4096)}
VOCAB = 65536


def fingerprint():
    """helpers.provenance.fingerprint("kernel"): SHA-256 over the kernel source's path and bytes, 16 hex digits."""
    return hashlib.sha256(b"helpers/runtime/rwkv4_decode.c\0" + SOURCE.read_bytes()).hexdigest()[:16]


def provenance(description, threads, bandwidths):
    isa = [name for name, key in (("AVX-512 VNNI", "avx512_vnni"), ("AVX-VNNI", "avx_vnni"), ("AMX", "amx"), ("AVX2", "avx2"))
           if description[key]]
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    machine = {"cpu": description["model"], "vendor": description["vendor"], "family": description["family"],
               "model": description["model_number"], "isa": isa, "sockets": description["sockets"],
               "physical_cores": description["sockets"] * description["cores_per_socket"], "memory_gib": round(memory)}
    return {"kind": "kernel", "fingerprint": fingerprint(), "date": datetime.date.today().isoformat(), "machine": machine,
            "threads": max(threads), "command": " ".join(["python helpers/kernel_sweep.py", *sys.argv[1:]]),
            "read_bandwidth_gbs": [round(min(bandwidths), 1), round(max(bandwidths), 1)]}


def cpu_description():
    fields = {}
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    flags = set(fields.get("Flags", "").split())
    return {
        "model": fields.get("Model name", platform.processor()),
        "vendor": fields.get("Vendor ID", ""),
        "family": fields.get("CPU family"),
        "model_number": fields.get("Model"),
        "sockets": int(fields.get("Socket(s)", 1)),
        "cores_per_socket": int(fields.get("Core(s) per socket", os.cpu_count())),
        "threads_per_core": int(fields.get("Thread(s) per core", 1)),
        "avx512_vnni": "avx512_vnni" in flags,
        "avx_vnni": "avx_vnni" in flags,
        "avx2": "avx2" in flags,
        "gfni": "gfni" in flags,
        "amx": "amx_tile" in flags,
    }


def compile_kernel(folder, description):
    """The kernel's fastest build for this CPU (see helpers/runtime/rwkv4_decode.c), compiled for it."""
    kernel = "AVX512" if description["avx512_vnni"] else "AVXVNNI" if description["avx_vnni"] else "AVX2"
    library = Path(folder) / "rwkv4_decode.so"
    subprocess.run([os.environ.get("CC", "cc"), "-O3", "-march=native", f"-DKERNEL_{kernel}", "-fopenmp", "-shared",
                    "-fPIC", str(SOURCE), "-o", str(library), "-lm"], check=True)
    native = ctypes.CDLL(str(library))
    native.rwkv4_matmul.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                    ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    native.rwkv4_matmul.restype = ctypes.c_int  # -1: its buffers could not be allocated
    return native


def random_int4(rows, cols, generator):
    """A sym_int4 matrix of random nibbles, every block scaled by 0.01."""
    blocks = torch.randint(0, 256, (rows, cols // BLOCK, BLOCK_BYTES), dtype=torch.uint8, generator=generator)
    blocks[:, :, :2] = torch.tensor([0.01], dtype=torch.float16).view(torch.uint8)
    return blocks.reshape(-1)


def token_matrices(shape):
    """(weights, rows, cols) of every linear one decoded token reads."""
    layers, hidden = SHAPES[shape]
    per_layer = [(hidden, hidden)] * 5 + [(4 * hidden, hidden), (hidden, 4 * hidden)]
    generator = torch.Generator().manual_seed(0)
    return [(random_int4(rows, cols, generator), rows, cols) for rows, cols in per_layer * layers + [(VOCAB, hidden)]]


def read_bandwidth_gbs(threads, repeats=5):
    torch.set_num_threads(threads)
    matrix = torch.ones(2**28 // 4096, 4096)  # 1 GiB of fp32
    best = min(_seconds(matrix.sum) for _ in range(repeats))
    return matrix.numel() * 4 / best / 1e9


def _seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def sweep(shape, thread_counts):
    description = cpu_description()
    if not description["avx2"]:
        return {"shape": shape, "error": f"this CPU ({description['model']}) lacks AVX2"}
    with tempfile.TemporaryDirectory() as folder:
        native = compile_kernel(folder, description)
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
            milliseconds = statistics.median(_seconds(lambda: one_token(threads)) for _ in range(7)) * 1000
            records.append({"threads": threads, "kernel_ms": milliseconds, "bandwidth_gbs": bandwidth,
                            "bound_ms": weight_bytes / (bandwidth * 1e9) * 1000})
            print(json.dumps(records[-1]), flush=True)
    made = provenance(description, thread_counts, [record["bandwidth_gbs"] for record in records])
    return {"provenance": made, "shape": shape, "weight_bytes": weight_bytes, "records": records}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1b5", choices=list(SHAPES))
    parser.add_argument("--threads", default="", help="comma-separated thread counts (default: 1, 2, 4, ... all CPUs)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    cpus = os.cpu_count()
    counts = [int(n) for n in args.threads.split(",")] if args.threads else sorted(
        {min(2**i, cpus) for i in range(cpus.bit_length() + 1)})
    result = sweep(args.shape, counts)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
