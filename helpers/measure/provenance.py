"""Where a committed measurement came from: machine, date, threads, read bandwidth, and a fingerprint of the
code that decides its speed. Every table rendered from a committed run names its machine and date, and a run
whose fingerprint is not this code's is refused, so a table cannot go stale silently.
"""
import ast
import datetime
import hashlib
import re
import sys
from pathlib import Path

import psutil

from helpers.runtime import library, settings
from helpers.runtime.cpu import AVX512, cpu_info
from helpers.runtime.errors import UserError
from helpers.runtime.memory import GIB
from helpers.runtime.paths import REPO_ROOT

# The kernel source, and the code that loads a model and runs it: what a decoding figure depends on.
DECODING_CODE = ["helpers/runtime/rwkv4_decode.c", "helpers/runtime/fused_decode.py", "helpers/runtime/batching.py",
                 "helpers/runtime/loading.py", "helpers/runtime/checkpoint_files.py", "helpers/runtime/tensor_loading.py",
                 "helpers/runtime/low_bit_cache.py", "helpers/runtime/rwkv_cpu.py", "helpers/runtime/rwkv_state.py"]
CODE = {
    "kernel": ["helpers/runtime/rwkv4_decode.c"],  # helpers/tools/kernel_sweep.py times the kernel alone
    "decoding": DECODING_CODE,
    "tokenizer": ["helpers/runtime/tokenization_rwkv_world.py"],  # helpers/tools/tokenizer_speed.py
    "serving": DECODING_CODE + ["helpers/serving/scheduler.py", "helpers/serving/state_cache.py", "helpers/serving/worker.py",
                                "helpers/serving/rwkv_worker.py", "helpers/serving/api_server.py", "helpers/serving/http.py"],
}
ISA = [("AVX-512 VNNI", {"avx512_vnni", *AVX512}), ("AVX-512", AVX512), ("AVX-VNNI", {"avx_vnni"}),
       ("AMX", {"amx_tile", "amx_int8"}), ("AVX2", {"avx2"})]


class StaleResults(UserError):
    """A committed run measured with other code than this checkout's."""


# A C string or character literal (kept), or a comment (dropped).
C_LITERAL_OR_COMMENT = re.compile(r'"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'|//[^\n]*|/\*.*?\*/', re.S)


def _without_docstring(node):
    body = getattr(node, "body", None)
    if (isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)):
        node.body = body[1:] or [ast.Pass()]


def code_of(path):
    """What of a source file decides what it does: a Python file's syntax tree without its docstrings (so not its
    comments or layout either), a C file's lines without comments and blank space (compiler flags live in
    fused_decode.py's tree)."""
    text = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix == ".py":
        tree = ast.parse(text)
        for node in ast.walk(tree):
            _without_docstring(node)
        return ast.dump(tree)
    text = C_LITERAL_OR_COMMENT.sub(lambda match: match[0] if match[0][0] in "\"'" else " ", text)
    return "\n".join(" ".join(line.split()) for line in text.splitlines() if line.strip())


def fingerprint(kind, root=REPO_ROOT):
    """16 hex digits of SHA-256 over the code (code_of) of the files CODE[kind] names, in that order: a committed
    run goes stale when its code changes, not when a comment or docstring does."""
    digest = hashlib.sha256()
    for name in CODE[kind]:
        digest.update(name.encode() + b"\0" + code_of(Path(root) / name).encode() + b"\0")
    return digest.hexdigest()[:16]


def command_line(module, argv=None):
    """How a run was asked for, as its provenance records it: `python -m MODULE ARGS` (argv, else this process's)."""
    return " ".join([f"python -m {module}", *(sys.argv[1:] if argv is None else argv)])


def instruction_sets(info):
    """The names of the instruction sets that matter here that a CpuInfo has (AVX-512 VNNI standing for AVX-512)."""
    names = [name for name, flags in ISA if info.has(*flags)]
    return [name for name in names if not (name == "AVX-512" and "AVX-512 VNNI" in names)]


def machine():
    """The CPU (model, family and model numbers, instruction sets that matter here), cores, sockets, RAM: the
    real one's, with "run_as" the RWKV_CPUINFO file where the run saw another CPU."""
    info, run_as = cpu_info(real=True), settings.read().cpuinfo
    return {"cpu": info.model, "vendor": info.vendor, "family": info.family or None, "model": info.model_number or None,
            "isa": instruction_sets(info), "physical_cores": info.physical_cores, "sockets": info.sockets,
            "memory_gib": round(psutil.virtual_memory().total / GIB), **({"run_as": run_as} if run_as else {})}


def describe(described):
    """One line for a machine() dict: 'Intel(R) Xeon(R) Processor (family 6, model 143; AVX-512 VNNI, AMX), 2 cores, 24 GiB'."""
    numbers = f"family {described['family']}, model {described['model']}; " if described.get("family") else ""
    return (f"{described['cpu']} ({numbers}{', '.join(described['isa'])}), {described['physical_cores']} cores"
            f"{', %d sockets' % described['sockets'] if described['sockets'] > 1 else ''}, {described['memory_gib']} GiB"
            f"{', run as %s describes its CPU' % described['run_as'] if described.get('run_as') else ''}")


def stamp(kind, command, threads, bandwidths_gbs):
    """The provenance of a run made now, on this machine, with this code; bandwidths_gbs: the read bandwidths
    sampled while it ran (None for a run that memory does not bound)."""
    return {"kind": kind, "fingerprint": fingerprint(kind), "date": datetime.date.today().isoformat(),
            "machine": machine(), "threads": threads, "command": command, "library": library.described(),
            "read_bandwidth_gbs": [round(min(bandwidths_gbs), 1), round(max(bandwidths_gbs), 1)] if bandwidths_gbs else None}


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
    """'Measured on DATE on MACHINE, N threads, read bandwidth A to B GB/s; KIND code FINGERPRINT, LIBRARY VERSION.'"""
    bandwidth = provenance["read_bandwidth_gbs"]
    read = f", read bandwidth {bandwidth[0]:.0f} to {bandwidth[1]:.0f} GB/s" if bandwidth else ""
    threads = f"{provenance['threads']} thread{'s' if provenance['threads'] != 1 else ''}"
    made_with = f", {provenance['library']}" if provenance.get("library") else ""
    return (f"Measured {provenance['date']} on {describe(provenance['machine'])}, {threads}{read}; "
            f"{provenance['kind']} code {provenance['fingerprint']}{made_with}.")
