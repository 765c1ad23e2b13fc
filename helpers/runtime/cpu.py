"""CPU facts, and the choice of bigdl-llm's native kernel library.

bigdl-llm ships one build of its kernels per instruction set (``libllama_avx.so`` ...
``libllama_amx.so``) and a dispatcher that picks one by CPU *vendor*: a non-Intel CPU gets the
plain AVX build even when it has AVX-512, which is several times slower. We choose by the CPU's
actual flags instead and point ``LLAMA_CPP_LIB`` at the build, which must happen before
``bigdl.llm`` is first imported (``helpers.runtime.startup.start()`` does it). ``RWKV_NATIVE_BUILD=avx2`` (or
another build's name) picks a slower build this CPU can run, to test or measure the path of an older CPU.
"""
import importlib.util
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

from helpers.runtime.errors import UserError
from helpers.runtime.settings import use_native_library

AVX512 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}

# Fastest first; each build runs only where the CPU has all of its flags (else SIGILL).
NATIVE_BUILDS = [
    ("amx", AVX512 | {"avx512_vnni", "amx_tile", "amx_int8"}),
    ("avx512", AVX512),
    ("avxvnni", {"avx2", "fma", "avx_vnni"}),
    ("avx2", {"avx2", "fma"}),
    ("avx", {"avx"}),
]


@dataclass
class CpuInfo:
    vendor: str
    model: str
    physical_cores: int
    sockets: int
    flags: frozenset
    family: str = ""  # /proc/cpuinfo's "cpu family" and "model" numbers, where there is one
    model_number: str = ""

    def has(self, *flags):
        return all(flag in self.flags for flag in flags)


def _parse_proc_cpuinfo(text):
    vendor = model = family = model_number = ""
    flags = set()
    cores = set()
    sockets = set()
    physical_id = "0"
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "vendor_id":
            vendor = value
        elif key == "model name":
            model = value
        elif key == "cpu family":
            family = value
        elif key == "model":
            model_number = value
        elif key == "flags":
            flags = set(value.split())
        elif key == "physical id":
            physical_id = value
            sockets.add(value)
        elif key == "core id":
            cores.add((physical_id, value))
    return CpuInfo(vendor, model, len(cores) or os.cpu_count() or 1, len(sockets) or 1, frozenset(flags), family,
                   model_number)


def cpu_info():
    """Vendor, model, physical cores, sockets and instruction-set flags of this CPU."""
    proc = Path("/proc/cpuinfo")
    if proc.exists():
        return _parse_proc_cpuinfo(proc.read_text())
    import cpuinfo  # py-cpuinfo, installed with bigdl-llm; used on Windows and macOS

    info = cpuinfo.get_cpu_info()
    flags = frozenset(flag.replace("avx512vnni", "avx512_vnni") for flag in info.get("flags", []))
    cores = max(1, (os.cpu_count() or 2) // 2)
    return CpuInfo(info.get("vendor_id_raw", ""), info.get("brand_raw", platform.processor()), cores, 1, flags)


def require_avx2(info=None):
    info = info or cpu_info()
    if not info.has("avx2"):
        raise UserError(
            f"This CPU ({info.model or 'unknown'}) lacks AVX2, which bigdl-llm's INT4 kernels need. "
            "Run on a CPU from 2013 or later (Intel Haswell / AMD Zen or newer)."
        )


def bigdl_libs_dir():
    spec = importlib.util.find_spec("bigdl.llm")
    if spec is None:
        raise UserError("bigdl-llm is not installed: run `make install` (or see README.md).")
    return Path(spec.origin).parent / "libs"


@dataclass
class NativeChoice:
    build: str
    path: str
    reason: str


def choose_native_library(info=None, libs_dir=None, wanted=None):
    """The fastest libllama build whose instructions this CPU has (or the build `wanted`, if it has its
    instructions), and why."""
    info = info or cpu_info()
    libs_dir = Path(libs_dir or bigdl_libs_dir())
    builds = dict(NATIVE_BUILDS)
    if wanted and (wanted not in builds or not info.has(*builds[wanted])):
        runnable = [build for build, needed in NATIVE_BUILDS if info.has(*needed)]
        raise UserError(f"RWKV_NATIVE_BUILD={wanted} is not a build this CPU runs; choose one of {', '.join(runnable)}.")
    for build, needed in NATIVE_BUILDS:
        path = libs_dir / f"libllama_{build}{'.dll' if sys.platform == 'win32' else '.so'}"
        if (wanted or build) == build and info.has(*needed) and path.exists():
            reason = (f"chosen by RWKV_NATIVE_BUILD ({', '.join(sorted(needed))})" if wanted else
                      f"fastest build whose instructions this CPU has ({', '.join(sorted(needed))})")
            return NativeChoice(build, str(path), reason)
    raise UserError(f"No bigdl-llm kernel build in {libs_dir} runs on this CPU (flags lack AVX).")


def select_native_library(wanted=None, preset=None):
    """Point LLAMA_CPP_LIB at the best build (or the build `wanted`), unless the user set it (`preset`, a
    path). Returns the NativeChoice."""
    choice = choose_native_library(wanted=wanted)
    if preset and Path(preset).resolve() != Path(choice.path).resolve():
        build = Path(preset).stem.replace("libllama_", "").replace("libllama-", "")
        return NativeChoice(build, preset, "set by you in LLAMA_CPP_LIB")
    if "bigdl.llm.ggml.model.llama.llama_cpp" in sys.modules:
        loaded = loaded_native_library()
        if loaded != Path(choice.path).name:
            return NativeChoice(loaded or "unknown", "", "bigdl.llm loaded its kernels before helpers chose them: "
                                "restart, and call setup() (or helpers.runtime.startup.start()) first")
    use_native_library(choice.path)  # also inherited by the processes this one starts
    return choice


def loaded_native_library():
    """The libllama build mapped into this process, read from /proc/self/maps (Linux), or None."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return None
    for line in maps.read_text().splitlines():
        name = line.rsplit("/", 1)[-1]
        if name.startswith("libllama_") and "bigdl" in line:
            return name
    return None
