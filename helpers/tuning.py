"""What notebook 04 measures: decode speed against threads, kernel builds, OpenMP and allocators, pinning.

Each configuration runs in a fresh process (threads, LD_PRELOAD and the kernel build are fixed when a
process starts):  python -m helpers.tuning --worker  prints one JSON line with its decode speed.
"""
import json
import os
import shutil
import statistics
import subprocess
import sys

from helpers import fused_decode
from helpers.cpu import NATIVE_BUILDS, bigdl_libs_dir, cpu_info
from helpers.environment import bigdl_llm_init_settings
from helpers.paths import DATA_DIR

PROMPT_TOKENS, DECODE_TOKENS = 16, 48
SWEEPS_DIR = DATA_DIR / "sweeps"
RUNTIMES = {  # name: bigdl-llm-init options
    "Intel OpenMP, system malloc": "",
    "Intel OpenMP, jemalloc": "-j",
    "Intel OpenMP, tcmalloc": "-t",
    "GNU OpenMP, system malloc": "-o",
}


def measure(threads, env=None, prefix=()):
    """Decode tokens/s of the notebooks' model (RWKV_MODEL or the offline checkpoint) in a fresh process."""
    full_env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": str(threads)}
    command = [*prefix, sys.executable, "-m", "helpers.tuning", "--worker"]
    result = subprocess.run(command, capture_output=True, text=True, env=full_env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["tokens_per_s"]


def thread_counts():
    return list(range(1, cpu_info().physical_cores + 1))


def native_builds():
    """{build: environment} for each bigdl-llm kernel build this CPU can run, decoding through it
    (the fused step turned off), after the fused step itself where it is available."""
    info = cpu_info()
    builds = {"fused step (helpers)": {}} if fused_decode.library() is not None else {}
    for build, needed in NATIVE_BUILDS:
        if info.has(*needed):
            builds[f"bigdl {build}"] = {"LLAMA_CPP_LIB": str(bigdl_libs_dir() / f"libllama_{build}.so"),
                                        "RWKV_FUSED_DECODE": "0"}
    return builds


def runtime_env(options):
    """The environment `source bigdl-llm-init OPTIONS` would give a program started after it."""
    settings = bigdl_llm_init_settings(options, shorten=False)
    return {"LD_PRELOAD": settings.get("LD_PRELOAD", ""), **({"MALLOC_CONF": settings["MALLOC_CONF"]} if "MALLOC_CONF" in settings else {})}


def pinnings(threads):
    """{label: command prefix} for running unpinned and pinned to the first `threads` cores."""
    cores = f"0-{threads - 1}"
    options = {"not pinned": (), f"taskset -c {cores}": ("taskset", "-c", cores)}
    if shutil.which("numactl"):
        options[f"numactl -C {cores} -m 0"] = ("numactl", "-C", cores, "-m", "0")
    return options


def kernel_sweeps():
    """The committed runs of helpers/kernel_sweep.py on a bigger machine (data/sweeps/), smallest shape first."""
    return [json.loads(path.read_text()) for path in sorted(SWEEPS_DIR.glob("fused-kernel-*.json"))]


def recommended_commands():
    """The upstream README's advice made concrete for this machine (a rule, not a measurement)."""
    info = cpu_info()
    per_socket = max(1, info.physical_cores // info.sockets)
    client = f"OMP_NUM_THREADS={info.physical_cores} python -m helpers.generate"
    server = (f"source bigdl-llm-init -t\nOMP_NUM_THREADS={per_socket} numactl -C 0-{per_socket - 1} -m 0 "
              "python -m helpers.generate")
    return client, server


def worker():
    import torch

    import helpers  # noqa: F401
    from helpers.loading import load_model
    from helpers.models import resolve_model
    from helpers.streaming import timed_greedy_decode

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    model = load_model(resolve_model(None), "sym_int4")
    run = timed_greedy_decode(model, torch.arange(1, PROMPT_TOKENS + 1).unsqueeze(0), DECODE_TOKENS)
    print(json.dumps({"tokens_per_s": 1000 / statistics.median(run.latency_ms)}))


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    worker()
