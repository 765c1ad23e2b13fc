"""The low-bit library helpers drives: bigdl-llm (package ``bigdl.llm``, the default) or its successor ipex-llm
(``ipex_llm``), the same API under another name. The one module that names either package: the others
import the library through ``module()``, after ``helpers.runtime.startup.start()``.

RWKV_LIBRARY (``--library``) chooses where both are installed; otherwise the one installed is used.
"""
import ctypes
import importlib
import importlib.util
import sys
from importlib import metadata
from pathlib import Path

from helpers.runtime import settings
from helpers.runtime.errors import UserError

PACKAGES = {"bigdl-llm": "bigdl.llm", "ipex-llm": "ipex_llm"}  # distribution: the package it installs
INIT_SCRIPTS = {"bigdl-llm": "bigdl-llm-init", "ipex-llm": "ipex-llm-init"}
# Set before ipex-llm is imported: its converter marks the head "lm_head", whose forward then keeps only the
# last position of a prompt over 10 tokens (perplexity needs them all); and it would alias bigdl.llm to itself.
IMPORT_VARIABLES = {"ipex-llm": {"IPEX_LLM_LAST_LM_HEAD": "0", "BIGDL_COMPATIBLE_MODE": "0"}}
KERNELS = "ggml.model.llama.llama_cpp"  # the module that loads libllama and holds its ctypes functions


def installed():
    """The libraries installed in this environment, the default first."""
    return [name for name, package in PACKAGES.items() if _spec(package)]


def _spec(package):
    try:
        return importlib.util.find_spec(package)
    except ModuleNotFoundError:  # bigdl.llm's parent, bigdl, is missing
        return None


def name():
    """The library in use: RWKV_LIBRARY's where set, else the first installed. UserError where none is."""
    wanted, found = settings.read().library, installed()
    if wanted and wanted not in PACKAGES:
        raise UserError(f"RWKV_LIBRARY={wanted} is not a library helpers drives; set it to "
                        f"{' or '.join(PACKAGES)}, or unset it")
    if wanted and wanted not in found:
        raise UserError(f"RWKV_LIBRARY={wanted}, but {wanted} is not installed here"
                        f"{'' if not found else f' ({found[0]} is)'}: run `make install` (or "
                        "`make install LIBRARY=ipex-llm`), or unset it")
    if not found:
        raise UserError("Neither bigdl-llm nor ipex-llm is installed: run `make install` (or see README.md).")
    return wanted or found[0]


def package():
    return PACKAGES[name()]


def version():
    return metadata.version(name())


def described():
    """'bigdl-llm 2.5.0b20240627': the library in use and its version, or None where none is installed."""
    try:
        return f"{name()} {version()}"
    except UserError:
        return None


def module(submodule=""):
    """The library's module `submodule` (e.g. "transformers.low_bit_linear"), imported."""
    return importlib.import_module(".".join(filter(None, [package(), submodule])))


def imported(submodule=""):
    """Whether the library's module `submodule` is imported already in this process."""
    return ".".join(filter(None, [package(), submodule])) in sys.modules


def import_variables():
    """{variable: value} the library must find when it is imported (start() sets them)."""
    return IMPORT_VARIABLES.get(name(), {})


def libs_dir():
    """The folder of the library's native builds (libllama_avx2.so ...)."""
    return Path(_spec(package()).origin).parent / "libs"


def init_script():
    """The name of the library's script that sets OpenMP and allocator variables (`source bigdl-llm-init`)."""
    return INIT_SCRIPTS[name()]


def low_bit_linear():
    """The library's low_bit_linear module (LowBitLinear, FP4Params, ggml_tensor_qtype, its matmul)."""
    return module("transformers.low_bit_linear")


def quantize_tensor(source, destination, qtype, values, columns):
    """Quantize `values` fp32 values at the address `source`, rows of `columns`, into blocks at `destination`
    (ipex-llm's quantizer takes one more argument, scale_search, off as bigdl-llm's)."""
    kernels = module(KERNELS)
    extra = (False,) if name() == "ipex-llm" else ()
    kernels.ggml_quantize_tensor(ctypes.cast(source, ctypes.POINTER(ctypes.c_float)), ctypes.c_void_p(destination),
                                 qtype, values, columns, (ctypes.c_int64 * 16)(), *extra)
