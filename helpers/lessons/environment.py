"""What notebook 01 checks: versions (the low-bit library's among them), CPU, native library, memory, the library's
init script, and a verdict."""
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata

from helpers.measure import provenance
from helpers.measure.results import read_run, run_path
from helpers.measure.checkpoints import make_config
from helpers.runtime import fused_decode, library
from helpers.runtime.cpu import AVX512, choose_native_library, cpu_info, loaded_native_library
from helpers.runtime.low_bit_cache import planned_loader
from helpers.runtime.memory import GIB, available_bytes, estimate_load_bytes
from helpers.runtime.settings import child_environment

OTHER_PACKAGES = ["rwkv", "safetensors", "jupyterlab", "ipywidgets", "nbval"]
# The seed's rule of thumb for an X-billion model saved in 16-bit, and the real parameter counts.
HUB_SIZES = {"169m": 0.169, "430m": 0.43, "1b5": 1.5, "3b": 3.0, "7b": 7.0}


def versions():
    """Python's minor version, the low-bit library in use, and each package's release (without a build tag such as
    torch's +cpu): the same on every machine set up from the same requirements file."""
    rows = [("Python", ".".join(platform.python_version_tuple()[:2]))]
    for package in ["torch", "transformers", library.name(), *OTHER_PACKAGES]:
        try:
            rows.append((package, metadata.version(package).split("+")[0]))
        except metadata.PackageNotFoundError:
            rows.append((package, "not installed"))
    return rows


def cpu_rows():
    info = cpu_info()
    yes_no = lambda flag: "yes" if flag else "no"  # noqa: E731
    return [
        ("vendor", info.vendor),
        ("model", info.model),
        ("physical cores", info.physical_cores),
        ("sockets", info.sockets),
        ("AVX2", yes_no(info.has("avx2"))),
        ("AVX-512", yes_no(info.has(*AVX512))),
        ("AVX-512 VNNI", yes_no(info.has("avx512_vnni"))),
        ("AVX-VNNI", yes_no(info.has("avx_vnni"))),
        ("AMX (int8)", yes_no(info.has("amx_tile", "amx_int8"))),
    ]


def native_library_rows(choice):
    return [
        ("build chosen", choice.build),
        ("why", choice.reason),
        ("loaded in this kernel", loaded_native_library() or "not yet (loads with the first low-bit model)"),
        (f"{library.name()}'s own pick (by vendor)", "the plain AVX build on non-Intel CPUs, whatever their flags"),
        ("decoding step", fused_decode.decoding_path()),
    ]


def measured(shape, option):
    """The committed `helpers.tools.bench --layout hub` record of one shape and option, or None."""
    if not run_path(f"{shape}-hub").exists():
        return None
    return next((record for record in read_run(f"{shape}-hub")["records"] if record["option"] == option), None)


def memory_source():
    """Which machines and dates the measured columns come from, in one line."""
    runs = [read_run(f"{shape}-hub")["provenance"] for shape in HUB_SIZES if run_path(f"{shape}-hub").exists()]
    if not runs:
        return "Measured: nothing committed (data/bench/SHAPE-hub.json)."
    dates = sorted({run["date"] for run in runs})
    machines = sorted({provenance.describe(run["machine"]) for run in runs})
    return f"Measured {dates[0]}{' to ' + dates[-1] if len(dates) > 1 else ''} on {'; '.join(machines)} (data/bench/SHAPE-hub.json)."


def model_memory_rows():
    """Per shape: the seed's rule of thumb, this project's estimate and its measurement, in GB."""
    rows = []
    for shape, billions in HUB_SIZES.items():
        config = make_config(shape)
        from_checkpoint, from_cache = measured(shape, "sym_int4"), measured(shape, "sym_int4_cache")
        gigabytes = lambda record, key: f"{record[key] * GIB / 1e9:.1f}" if record else "-"  # noqa: E731
        rows.append((
            shape,
            f"{billions:g}B",
            f"{2 * billions:.1f}",
            f"{0.5 * billions:.2f}",
            f"{estimate_load_bytes(config, 'sym_int4', 'tensor_by_tensor') / 1e9:.1f}",
            gigabytes(from_checkpoint, "peak_load_rss_gib"),
            gigabytes(from_cache, "peak_load_rss_gib"),
            gigabytes(from_checkpoint, "steady_rss_gib"),
        ))
    return rows


MODEL_MEMORY_HEADERS = ["shape", "params", "rule: load (2X)", "rule: run (0.5X)", "estimate: load",
                        "measured: load", "measured: load from cache", "measured: run"]


def init_script_settings(options="", shorten=True):
    """The variables `source bigdl-llm-init OPTIONS` (or ipex-llm-init) sets, as {name: value}; shorten: venv path
    as <venv>."""
    script = shutil.which(library.init_script(), path=os.path.dirname(sys.executable))
    if script is None:
        return {}
    command = f"source '{script}' {options} >/dev/null 2>&1; env -0"
    path = os.path.dirname(sys.executable) + os.pathsep + child_environment().get("PATH", "")  # its python3: bigdl
    output = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env={"PATH": path}).stdout
    settings = dict(line.split("=", 1) for line in output.split("\0") if "=" in line)
    prefix = os.path.dirname(os.path.dirname(sys.executable))
    return {name: value.replace(prefix, "<venv>") if shorten else value for name, value in sorted(settings.items())
            if name in ("OMP_NUM_THREADS", "LD_PRELOAD", "MALLOC_CONF", "KMP_AFFINITY", "KMP_BLOCKTIME")}


LOADER_WORDS = {"cache": "from its low-bit cache", "tensor_by_tensor": "from its checkpoint, tensor by tensor"}


def verdicts(source):
    """(requirement, ok, what to do) for the things this tutorial needs, the memory for the model `source`
    as helpers.runtime.loading.load_model will load it (from the low-bit cache once there is one)."""
    info = cpu_info()
    loader = planned_loader(source)
    needed = estimate_load_bytes(source.config, "sym_int4", loader)
    reference = estimate_load_bytes(make_config("7b", layout="hub"), "sym_int4", "tensor_by_tensor")
    free = available_bytes()
    try:
        choose_native_library(info)
        library_ok = True
    except Exception:
        library_ok = False
    return [
        ("Python 3.11", sys.version_info[:2] == (3, 11), "install Python 3.11 and run `make install`"),
        ("x86-64 CPU", platform.machine().lower() in ("x86_64", "amd64"), f"{library.name()}'s CPU kernels are x86-64 only"),
        ("AVX2", info.has("avx2"), "use a CPU from 2013 or later (Intel Haswell, AMD Zen)"),
        ("a native kernel build for this CPU", library_ok, f"reinstall {library.name()}: `make clean install`"),
        ("(optional) a C compiler, for the fused decoding step", fused_decode.library() is not None,
         f"without one decoding runs through {library.name()}'s kernels, slower (notebook 04 measures both); `apt install gcc`"),
        (f"RAM to load {source.name} in INT4 {LOADER_WORDS[loader]} ({needed / GIB:.2f} GiB)", free >= needed,
         "pick a smaller model (169m to 3b), or load a low-bit cache made on a bigger machine"),
        (f"(for the 7B) RAM to convert RWKV/rwkv-4-world-7b from its pytorch_model.bin ({reference / GIB:.1f} GiB)",
         free >= reference, "use a smaller model here (169m to 3b), or copy a low-bit cache made on a bigger machine"),
    ]
