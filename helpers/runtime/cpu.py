"""CPU facts, and the choice of the low-bit library's native kernel library.

bigdl-llm (and ipex-llm after it) ships one build of its kernels per instruction set (``libllama_avx.so`` ...
``libllama_amx.so``) and a dispatcher that picks one by CPU *vendor*: a non-Intel CPU gets the
plain AVX build even when it has AVX-512, which is several times slower. We choose by the CPU's
actual flags instead and point ``LLAMA_CPP_LIB`` at the build, which must happen before
the library is first imported (``helpers.runtime.startup.start()`` does it). ``RWKV_NATIVE_BUILD=avx2`` (or
another build's name) picks a slower build this CPU can run, to test or measure the path of an older CPU.
RWKV_CPUINFO (a file in /proc/cpuinfo's format, tests/cpus/) makes every choice here as that CPU would.
"""
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

from helpers.runtime.errors import UserError
from helpers.runtime import library, settings
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
    core_of: dict = field(default_factory=dict)  # {logical CPU: (physical id, core id)}, as /proc/cpuinfo lists them

    def has(self, *flags):
        return all(flag in self.flags for flag in flags)

    def physical_cores_of(self, cpus=None):
        """{(physical id, core id): [its logical CPUs among cpus (default: those this process may use)]}, in
        socket and core order (a logical CPU that /proc/cpuinfo does not place is a core of its own)."""
        cores = {}
        for number in sorted(cpus or os.sched_getaffinity(0)):
            cores.setdefault(self.core_of.get(number, (-1, number)), []).append(number)
        return dict(sorted(cores.items()))


def _parse_proc_cpuinfo(text):
    vendor = model = family = model_number = ""
    flags = set()
    cores = set()
    sockets = set()
    physical_id, processor, core_of = "0", None, {}
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "processor" and value.isdigit():
            processor = int(value)
        elif key == "vendor_id":
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
        elif key == "core id" and value.isdigit():
            cores.add((physical_id, value))
            if processor is not None and physical_id.isdigit():
                core_of[processor] = (int(physical_id), int(value))
    return CpuInfo(vendor, model, len(cores) or os.cpu_count() or 1, len(sockets) or 1, frozenset(flags), family,
                   model_number, core_of)


def cpu_list(numbers):
    """Logical CPU numbers as taskset -c lists them: [0, 1, 2, 3, 8, 10] as "0-3,8,10"."""
    runs = []
    for number in sorted(numbers):
        if runs and number == runs[-1][-1] + 1:
            runs[-1][-1] = number
        else:
            runs.append([number, number])
    return ",".join(f"{first}-{last}" if last > first else str(first) for first, last in runs)


def _instruction_sets(flags):
    """The flags that decide which code runs (the vector and matrix instruction sets)."""
    return {flag for flag in flags if flag.startswith(("avx", "amx", "fma", "f16c"))}


def _stand_in(path, real):
    """The CpuInfo of the cpuinfo file at path, which must claim no instruction set the real CPU lacks."""
    try:
        info = _parse_proc_cpuinfo(Path(path).read_text())
    except (OSError, UnicodeError) as error:
        raise UserError(f"RWKV_CPUINFO={path} cannot be read ({error.__class__.__name__}); name a file in "
                        "/proc/cpuinfo's format, such as tests/cpus/epyc-zen3.cpuinfo, or unset it") from None
    lacking = _instruction_sets(info.flags) - real.flags
    if lacking:
        raise UserError(f"RWKV_CPUINFO={path} claims {', '.join(sorted(lacking))}, which this CPU lacks: code built "
                        "for them would crash; name a CPU with fewer instruction sets than this one")
    return info


def cpu_info(real=False):
    """Vendor, model, physical cores, sockets and instruction-set flags of this CPU: of the CPU that
    RWKV_CPUINFO describes, where it is set, unless `real`."""
    proc = Path("/proc/cpuinfo")
    if proc.exists():
        found = _parse_proc_cpuinfo(proc.read_text())
        stand_in = None if real else settings.read().cpuinfo
        return _stand_in(stand_in, found) if stand_in else found
    import cpuinfo  # py-cpuinfo, installed with the low-bit library; used on Windows and macOS

    info = cpuinfo.get_cpu_info()
    flags = frozenset(flag.replace("avx512vnni", "avx512_vnni") for flag in info.get("flags", []))
    cores = max(1, (os.cpu_count() or 2) // 2)
    return CpuInfo(info.get("vendor_id_raw", ""), info.get("brand_raw", platform.processor()), cores, 1, flags)


def require_avx2(info=None):
    info = info or cpu_info()
    if not info.has("avx2"):
        raise UserError(
            f"This CPU ({info.model or 'unknown'}) lacks AVX2, which the low-bit library's INT4 kernels need. "
            "Run on a CPU from 2013 or later (Intel Haswell / AMD Zen or newer)."
        )


@dataclass
class NativeChoice:
    build: str
    path: str
    reason: str


def choose_native_library(info=None, libs_dir=None, wanted=None):
    """The fastest libllama build whose instructions this CPU has (or the build `wanted`, if it has its
    instructions), and why."""
    info = info or cpu_info()
    libs_dir = Path(libs_dir or library.libs_dir())
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
    raise UserError(f"No {library.name()} kernel build in {libs_dir} runs on this CPU (flags lack AVX).")


def select_native_library(wanted=None, preset=None, inherited=None):
    """Point LLAMA_CPP_LIB at the best build (or the build `wanted`), unless the user set it (`preset`, a
    path, other than the `inherited` one a parent process chose). Returns the NativeChoice."""
    choice = choose_native_library(wanted=wanted)
    if preset and preset != inherited:  # the user's, even where it names the build we would choose
        build = Path(preset).stem.replace("libllama_", "").replace("libllama-", "")
        return NativeChoice(build, preset, "set by you in LLAMA_CPP_LIB")
    if library.imported(library.KERNELS):
        loaded = loaded_native_library()
        if loaded != Path(choice.path).name:
            return NativeChoice(loaded or "unknown", "", f"{library.name()} loaded its kernels before helpers chose them: "
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
        if name.startswith("libllama_") and f"/{library.package().split('.')[0]}/" in line:
            return name
    return None
