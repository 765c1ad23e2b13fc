"""Where a committed measurement came from: machine, date, threads, read bandwidth, and a fingerprint of the
code that decides its speed. Every table rendered from a committed run names its machine and date, and a run
whose fingerprint is not this code's is refused, so a table cannot go stale silently.
"""
import datetime
import hashlib
from pathlib import Path

import psutil

from helpers.runtime.cpu import AVX512, cpu_info
from helpers.runtime.errors import UserError
from helpers.runtime.memory import GIB
from helpers.runtime.paths import REPO_ROOT

# The kernel source, and the code that loads a model and runs it: what a decoding figure depends on.
DECODING_CODE = ["helpers/runtime/rwkv4_decode.c", "helpers/runtime/fused_decode.py", "helpers/runtime/batching.py",
                 "helpers/runtime/loading.py", "helpers/runtime/tensor_loading.py", "helpers/runtime/low_bit_cache.py",
                 "helpers/runtime/rwkv_cpu.py"]
CODE = {
    "kernel": ["helpers/runtime/rwkv4_decode.c"],  # helpers/tools/kernel_sweep.py times the kernel alone
    "decoding": DECODING_CODE,
    "serving": DECODING_CODE + ["helpers/serving/scheduler.py", "helpers/serving/state_cache.py", "helpers/serving/worker.py",
                                "helpers/serving/api_server.py", "helpers/serving/http.py"],
}
ISA = [("AVX-512 VNNI", {"avx512_vnni", *AVX512}), ("AVX-512", AVX512), ("AVX-VNNI", {"avx_vnni"}),
       ("AMX", {"amx_tile", "amx_int8"}), ("AVX2", {"avx2"})]


class StaleResults(UserError):
    """A committed run measured with other code than this checkout's."""


def fingerprint(kind, root=REPO_ROOT):
    """16 hex digits of SHA-256 over the bytes of the files CODE[kind] names, in that order."""
    digest = hashlib.sha256()
    for name in CODE[kind]:
        digest.update(name.encode() + b"\0" + (Path(root) / name).read_bytes())
    return digest.hexdigest()[:16]


def machine():
    """The CPU (model, family and model numbers, instruction sets that matter here), cores, sockets, RAM."""
    info = cpu_info()
    isa = [name for name, flags in ISA if info.has(*flags)]
    isa = [name for name in isa if not (name == "AVX-512" and "AVX-512 VNNI" in isa)]
    return {"cpu": info.model, "vendor": info.vendor, "family": info.family or None, "model": info.model_number or None,
            "isa": isa, "physical_cores": info.physical_cores, "sockets": info.sockets,
            "memory_gib": round(psutil.virtual_memory().total / GIB)}


def describe(described):
    """One line for a machine() dict: 'Intel(R) Xeon(R) Processor (family 6, model 143; AVX-512 VNNI, AMX), 2 cores, 24 GiB'."""
    numbers = f"family {described['family']}, model {described['model']}; " if described.get("family") else ""
    return (f"{described['cpu']} ({numbers}{', '.join(described['isa'])}), {described['physical_cores']} cores"
            f"{', %d sockets' % described['sockets'] if described['sockets'] > 1 else ''}, {described['memory_gib']} GiB")


def stamp(kind, command, threads, bandwidths_gbs):
    """The provenance of a run made now, on this machine, with this code; bandwidths_gbs: the read bandwidths
    sampled while it ran."""
    return {"kind": kind, "fingerprint": fingerprint(kind), "date": datetime.date.today().isoformat(),
            "machine": machine(), "threads": threads, "command": command,
            "read_bandwidth_gbs": [round(min(bandwidths_gbs), 1), round(max(bandwidths_gbs), 1)]}


def is_current(provenance):
    return provenance.get("fingerprint") == fingerprint(provenance["kind"])


def check_current(provenance, path):
    """Refuse a run whose code is not this checkout's, saying how to make a current one."""
    if not is_current(provenance):
        raise StaleResults(
            f"{path} was measured with other {provenance['kind']} code (fingerprint {provenance.get('fingerprint')}, "
            f"this checkout's {fingerprint(provenance['kind'])}): rerun `{provenance['command']}` on one machine and "
            "commit the file, or remove it")


def caption(provenance):
    """'Measured on DATE on MACHINE, N threads, read bandwidth A to B GB/s (code FINGERPRINT).'"""
    low, high = provenance["read_bandwidth_gbs"]
    return (f"Measured {provenance['date']} on {describe(provenance['machine'])}, {provenance['threads']} threads, "
            f"read bandwidth {low:.0f} to {high:.0f} GB/s; {provenance['kind']} code {provenance['fingerprint']}.")
