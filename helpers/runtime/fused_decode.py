"""RWKV-4 forwards (a prompt, a decoding step, or a step of several sequences) in one native call on
the low-bit weights of bigdl-llm or ipex-llm (FORMATS: sym_int4, asym_int4, sym_int5, sym_int8; the layers in one of them,
the head in the same or, in a mix, another).

The library's own INT4 kernel and the ~30 small torch operations per layer around it leave a token
at about 2.7x the time its weights take to read. rwkv4_decode.c reads the same blocks with
integer multiply-adds and prefetching (several tokens 8 at a time per unpacked block), and does the
layer norms, token shift, WKV and channel mix in place. `make install` compiles every build this CPU
runs (python -m helpers.tools.build_kernels: AVX-512 VNNI, AVX-VNNI or plain AVX2, KERNELS; all three
compute the same logits) into the kernel cache, a folder outside the project (RWKV_KERNEL_CACHE); one
missing there is compiled on first use. A process runs the fastest build, or the one the fused_kernel
setting names (to test or measure another CPU's path). The library describes its interface (the formats'
names, order and block bytes, every struct field's offset) and one that differs from this side's is
refused. Without a C compiler or AVX2, or for other formats, models run through the torch path, and the
first load says why (decoding_path). The fused_decode setting (RWKV_FUSED_DECODE=0) turns it off.
"""
import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from helpers.runtime import library as low_bit_library
from helpers.runtime import settings
from helpers.runtime.cpu import cpu_info
from helpers.runtime.formats import LOW_BIT_FORMATS as FORMATS  # the kernel's format numbers are their indices
from helpers.runtime.rwkv_state import check_token_ids, start_state

SOURCE = Path(__file__).with_name("rwkv4_decode.c")  # package data: an installed (not editable) package has it too
DEFAULT_CACHE = Path.home() / ".cache" / "rwkv-int4-notebooks" / "kernels"
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-Wall", "-Wextra"]
ABI_VERSION = 3  # rwkv4_decode.c's ABI_VERSION: raised when a function's arguments change (check_abi sees the rest)
BASE = ("avx2", "fma", "f16c")  # every build
# Fastest first: the CPU flags each build needs, and its compiler flags. Each build is compiled for
# exactly its instructions (not -march=native), so a forced build is the one its CPUs run.
KERNELS = {
    "avx512": (BASE + ("avx512f", "avx512vl", "avx512_vnni"), ["-mavx2", "-mfma", "-mf16c", "-mavx512vl", "-mavx512vnni"]),
    "avxvnni": (BASE + ("avx_vnni",), ["-mavx2", "-mfma", "-mf16c", "-mavxvnni"]),
    "avx2": (BASE, ["-mavx2", "-mfma", "-mf16c"]),
}
BLOCK = 64
BLOCK_BYTES = [34, 36, 42, 68]  # bytes of a block of 64 weights in each format (rwkv4_decode.c's block_bytes)
OUT_OF_MEMORY = -1  # what the library's functions return when they could not allocate their buffers
ROWS_PER_STEP = 8  # rows % 8 == 0: the kernel computes 8 rows at a time


class Layer(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in (
        "ln1_weight", "ln1_bias", "ln2_weight", "ln2_bias", "attention_mix", "time_first", "decay",
        "attention_key", "attention_value", "attention_receptance", "attention_output", "feed_forward_mix",
        "feed_forward_key", "feed_forward_receptance", "feed_forward_value",
    )] + [("output_scale", ctypes.c_float)]


class Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in ("layers", "hidden", "intermediate", "vocab", "rescale_every",
                                                   "format", "head_format")] + [
        ("eps", ctypes.c_float)] + [(name, ctypes.c_void_p) for name in (
            "embeddings", "ln0_weight", "ln0_bias", "ln_out_weight", "ln_out_bias", "head")] + [
        ("layer", ctypes.POINTER(Layer))]


def runnable_kernels(info=None):
    """{build: compiler flags} of the builds this CPU runs, fastest first."""
    info = info or cpu_info()
    runnable = {}
    for name, (needed, flags) in KERNELS.items():
        if info.has(*needed):
            runnable[name] = flags
        elif name == "avxvnni" and "avx512" in runnable:
            runnable[name] = runnable["avx512"]  # to test it here: the same instruction, EVEX-encoded
    return runnable


def kernel_choice(wanted=None, info=None):
    """(build, compiler flags): `wanted` (a KERNELS name, or "auto"/None for the fastest this CPU runs).

    Raises RuntimeError saying why when the CPU runs no build, or not the one wanted."""
    info = info or cpu_info()
    runnable = runnable_kernels(info)
    if wanted in (None, "", "auto"):
        if not runnable:
            missing = ", ".join(flag for flag in BASE if not info.has(flag))
            raise RuntimeError(f"this CPU lacks {missing}; decoding uses the low-bit library's kernels instead")
        wanted = next(iter(runnable))
    if wanted not in KERNELS:
        raise RuntimeError(f"RWKV_FUSED_KERNEL={wanted} is not a build; choose auto or one of {', '.join(KERNELS)}")
    if wanted not in runnable:
        missing = ", ".join(flag for flag in KERNELS[wanted][0] if not info.has(flag))
        raise RuntimeError(f"RWKV_FUSED_KERNEL={wanted} needs {missing}, which this CPU lacks; it runs "
                           f"{', '.join(runnable) or 'none of the builds'}")
    return wanted, [*runnable[wanted], f"-DKERNEL_{wanted.upper()}"]


def kernel_cache():
    """The folder compiled builds are kept in: the kernel_cache setting, else ~/.cache/rwkv-int4-notebooks/kernels."""
    return Path(settings.read().kernel_cache or DEFAULT_CACHE)


def _compiler():
    compiler = settings.read().compiler or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler found (install gcc, e.g. `apt install gcc`, then `make install`)")
    return compiler


def _compile(compiler, flags, output):
    result = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(output), "-lm"], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-500:]}")


def build_library(kernel=None, extra_flags=()):
    """Compile rwkv4_decode.c as the build `kernel` (default: the fastest this CPU runs) into the kernel
    cache, once per source, flags and compiler; returns its path.

    Raises RuntimeError saying why when the CPU cannot run it, or there is no compiler or it fails.
    """
    _, kernel_flags = kernel_choice(kernel)
    compiler = _compiler()
    flags = [*FLAGS, *kernel_flags, *extra_flags]
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
    folder = kernel_cache()
    library = folder / f"rwkv4_decode-{key}.so"
    if not library.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            partial = Path(scratch) / library.name
            _compile(compiler, flags, partial)
            os.replace(partial, library)  # atomic: other processes see a whole library or none
    return library


def check_warnings(kernel):
    """Compile the build `kernel` with warnings as errors, keeping nothing (CI's check); RuntimeError if any."""
    _, kernel_flags = kernel_choice(kernel)
    with tempfile.TemporaryDirectory() as scratch:
        _compile(_compiler(), [*FLAGS, *kernel_flags, "-Werror"], Path(scratch) / "check.so")


def interface():
    """The interface line (rwkv4_decode.c's rwkv4_interface) that the structs and formats here stand for."""
    formats = " ".join(f"{name}={size}" for name, size in zip(FORMATS, BLOCK_BYTES))

    def described(struct):
        fields = " ".join(f"{name}@{getattr(struct, name).offset}" for name, _ in struct._fields_)
        return f"{struct.__name__} {ctypes.sizeof(struct)}: {fields}"

    return f"version {ABI_VERSION}; block {BLOCK}; formats: {formats}; {described(Layer)}; {described(Model)}"


def check_abi(native, path):
    """RuntimeError (one line) unless the library's interface line is the one this code builds: its version, the
    formats' names, order and block bytes, and every struct field's offset."""
    if not hasattr(native, "rwkv4_interface"):
        raise RuntimeError(f"{path} was built from older source, which does not describe its interface; rebuild it "
                           "with `make install`")
    text = ctypes.create_string_buffer(4096)
    length = native.rwkv4_interface(text, len(text))
    found = text.value.decode() if 0 <= length < len(text) else "an interface too long to read"
    expected = interface()
    if found != expected:
        raise RuntimeError(f"{path} was built from other source: this code expects {_first_difference(expected, found)}; "
                           "rebuild it with `make install`")


def _first_difference(expected, found):
    """'Layer: attention_key@56 where the library has attention_key@64', from two interface lines."""
    for mine, theirs in zip(expected.split("; "), found.split("; ")):
        if mine != theirs:
            words = next(((a, b) for a, b in zip(mine.split(), theirs.split()) if a != b), (mine, theirs))
            return f"{mine.split()[0].rstrip(':')}: {words[0]} where the library has {words[1]}"
    return f"{expected!r} where the library has {found!r}"


def load_library(kernel=None, extra_flags=()):
    path = build_library(kernel, extra_flags)
    library = ctypes.CDLL(str(path))
    check_abi(library, path)
    library.rwkv4_forward.restype = library.rwkv4_matmul.restype = ctypes.c_int
    library.rwkv4_forward.argtypes = [ctypes.POINTER(Model), ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                      ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    library.rwkv4_matmul.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                     ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    library.rwkv4_kernel.restype = ctypes.c_char_p
    library.rwkv4_block_dots_per_second.restype = ctypes.c_double
    library.rwkv4_block_dots_per_second.argtypes = [ctypes.c_int, ctypes.c_int]
    return library


def kernel_name(native):
    """The build a loaded library is: avx512, avxvnni or avx2."""
    return native.rwkv4_kernel().decode()


_library, unavailable_reason = None, None


def library():
    """The compiled library, or None (with ``unavailable_reason`` set) when it can't be built or is off."""
    global _library, unavailable_reason
    if _library is None and unavailable_reason is None:
        wanted = settings.read()
        if not wanted.fused_decode:
            unavailable_reason = "turned off by RWKV_FUSED_DECODE=0"
        else:
            try:
                _library = load_library(wanted.fused_kernel)
            except (RuntimeError, OSError) as error:
                unavailable_reason = str(error)
    return _library


def decoding_path(model=None):
    """One line: whether low-bit models (or this model) decode through the fused step here, which build, and
    if not, why."""
    native = library()
    if native is not None and (model is None or getattr(model, "fused_forward", None) is not None):
        return f"helpers' fused step, its {kernel_name(native)} build (compiled for this CPU)"
    reason = unavailable_reason if native is None else "the model's weights are in formats the fused step does not read"
    return f"{low_bit_library.name()}'s kernels through torch (slower than the fused step): {reason}"


def linear_format(linear, rows, cols):
    """The FORMATS index of the library's low-bit linear of shape [rows, cols] the kernel can read, else None."""
    low_bit_linear = low_bit_library.low_bit_linear()
    if not (isinstance(linear, low_bit_linear.LowBitLinear) and tuple(linear.weight_shape) == (rows, cols)
            and rows % ROWS_PER_STEP == 0 and cols % BLOCK == 0):
        return None
    return next((index for index, name in enumerate(FORMATS) if linear.qtype == low_bit_linear.ggml_tensor_qtype[name]), None)


class FusedForward:
    """Runs a repaired low-bit RWKV-4 model on token ids, one or several sequences; see ``for_model``."""

    def __init__(self, model, native, format_index, head_format_index):
        config, rwkv = model.config, model.rwkv
        hidden, intermediate, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
        self.native, self.keep = native, []  # keep: every tensor whose address the C structs hold

        def low_bit(rows, cols, index=format_index):
            return torch.uint8, rows * cols // BLOCK * BLOCK_BYTES[index]

        vector, square = (torch.float32, hidden), low_bit(hidden, hidden)
        self.layers = (Layer * config.num_hidden_layers)()
        for index, (layer, block) in enumerate(zip(self.layers, rwkv.blocks)):
            attention, feed_forward = block.attention, block.feed_forward
            for field, tensor, (dtype, size) in (
                ("ln1_weight", block.ln1.weight, vector), ("ln1_bias", block.ln1.bias, vector),
                ("ln2_weight", block.ln2.weight, vector), ("ln2_bias", block.ln2.bias, vector),
                ("attention_mix", attention.time_mixes, (torch.float32, 3 * hidden)),
                ("time_first", attention.time_first, vector), ("decay", attention.decay, vector),
                ("feed_forward_mix", feed_forward.time_mixes, (torch.float32, 2 * hidden)),
                ("attention_key", attention.key.weight, square), ("attention_value", attention.value.weight, square),
                ("attention_receptance", attention.receptance.weight, square),
                ("attention_output", attention.output.weight, square),
                ("feed_forward_key", feed_forward.key.weight, low_bit(intermediate, hidden)),
                ("feed_forward_receptance", feed_forward.receptance.weight, square),
                ("feed_forward_value", feed_forward.value.weight, low_bit(hidden, intermediate)),
            ):
                setattr(layer, field, self._pointer(f"layer {index}'s {field}", tensor, dtype, size))
            layer.output_scale = attention.output_scale
        ln0 = rwkv.blocks[0].pre_ln
        self.model = Model(
            config.num_hidden_layers, hidden, intermediate, vocab,
            config.rescale_every if rwkv.layers_are_rescaled else 0, format_index, head_format_index,
            config.layer_norm_epsilon,
            self._pointer("embeddings", rwkv.embeddings.weight, torch.float16, vocab * hidden),
            self._pointer("ln0_weight", ln0.weight, *vector), self._pointer("ln0_bias", ln0.bias, *vector),
            self._pointer("ln_out_weight", rwkv.ln_out.weight, *vector),
            self._pointer("ln_out_bias", rwkv.ln_out.bias, *vector),
            self._pointer("head", model.head.weight, *low_bit(vocab, hidden, head_format_index)),
            self.layers,
        )

    def _pointer(self, name, tensor, dtype, size):
        """The address of a weight the kernel reads: `size` values of `dtype`, contiguous (ValueError if not)."""
        tensor = tensor.data
        if tensor.dtype != dtype or tensor.numel() != size or not tensor.is_contiguous():
            raise ValueError(f"the fused step reads {name} as {size} contiguous {dtype} values; the model has "
                             f"{tensor.numel()} {'contiguous ' if tensor.is_contiguous() else ''}{tensor.dtype} values")
        self.keep.append(tensor)
        return tensor.data_ptr()

    @classmethod
    def for_model(cls, model):
        """A FusedForward when the layers' linears are all in one of FORMATS, the head in one of them too, and
        the library is available; else None."""
        native = library()
        config, rwkv = model.config, model.rwkv
        hidden, intermediate = config.hidden_size, config.intermediate_size
        head_format, formats = linear_format(model.head, config.vocab_size, hidden), set()
        for block in rwkv.blocks:
            attention, feed_forward = block.attention, block.feed_forward
            square = [attention.key, attention.value, attention.receptance, attention.output, feed_forward.receptance]
            formats |= {linear_format(linear, hidden, hidden) for linear in square}
            formats |= {linear_format(feed_forward.key, intermediate, hidden),
                        linear_format(feed_forward.value, hidden, intermediate)}
        if (native is None or len(formats) != 1 or None in formats | {head_format}
                or config.attention_hidden_size != hidden
                or rwkv.embeddings.weight.dtype != torch.float16):  # the kernel reads fp16 embeddings
            return None
        return cls(model, native, formats.pop(), head_format)

    def can_run(self, input_ids, state):
        """Token ids [sequences, tokens], from the start or continuing a state laid out as transformers makes it."""
        return (input_ids is not None and input_ids.dim() == 2 and input_ids.numel() > 0
                and (state is None or all(s.dtype == torch.float32 and s.shape[0] == input_ids.shape[0]
                                          and s.is_contiguous() for s in state)))

    def new_state(self, sequences=1):
        return start_state(self.model.hidden, self.model.layers, sequences)

    def __call__(self, input_ids, state=None, all_logits=True):
        """(logits [sequences, tokens or 1, vocab], state): reads the tokens of each row of input_ids as a
        sequence of its own, continuing its row of the state, which is updated in place."""
        state = self.new_state(input_ids.shape[0]) if state is None else state
        rows = [[s[row] for s in state] for row in range(input_ids.shape[0])]
        return self.run(input_ids, rows, all_logits), state

    def run(self, input_ids, states, all_logits=False):
        """Logits [sequences, tokens or 1, vocab] of input_ids [sequences, tokens], row i continuing states[i]
        (five contiguous [hidden, layers] fp32 tensors, or [1, hidden, layers]), updated in place. A server's
        step: each sequence keeps its own state tensors, and the weights are read once for all.

        ValueError (one line) for ids or states the kernel cannot read, MemoryError when it cannot allocate
        its buffers (nothing is changed then)."""
        if input_ids.dim() != 2 or input_ids.numel() == 0:
            raise ValueError(f"the fused step reads token ids shaped [sequences, tokens], not {list(input_ids.shape)}")
        ids = input_ids.to(torch.int64).contiguous()
        sequences, tokens = ids.shape
        check_token_ids(ids, self.model.vocab)  # the kernel reads embedding rows by id
        self.check_states(states, sequences)
        logits = torch.empty(sequences, tokens if all_logits else 1, self.model.vocab)
        pointers = (ctypes.c_void_p * (5 * sequences))(*(s.data_ptr() for state in states for s in state))
        status = self.native.rwkv4_forward(ctypes.byref(self.model), ids.data_ptr(), sequences, tokens, pointers,
                                           logits.data_ptr(), int(all_logits), torch.get_num_threads())
        if status == OUT_OF_MEMORY:
            raise MemoryError(f"the fused step could not allocate its buffers for {sequences} sequence(s) of {tokens} "
                              "token(s); send fewer or shorter ones, or free memory")
        return logits

    def check_states(self, states, sequences):
        """ValueError (one line) unless there are `sequences` states of five contiguous fp32 tensors of this
        model's [hidden, layers] (or [1, hidden, layers]): the kernel reads and writes them by address."""
        model = self.model
        if len(states) != sequences:
            raise ValueError(f"the fused step needs one state per sequence: {sequences} sequence(s), {len(states)} state(s)")
        shapes = ([model.hidden, model.layers], [1, model.hidden, model.layers])
        for index, state in enumerate(states):
            if len(state) != 5 or any(list(s.shape) not in shapes or s.dtype != torch.float32 or not s.is_contiguous()
                                      for s in state):
                found = ", ".join(f"{list(s.shape)} {s.dtype}" for s in state)
                raise ValueError(f"state {index} must be five contiguous float32 tensors of shape {shapes[0]} "
                                 f"(this model's hidden size and layers), not {len(state)}: {found}")


def use_fused_step(model):
    """Let a model repaired by rwkv_cpu.repair_for_cpu run token ids through the fused step, where this CPU and
    the model's weights allow it (else it stays on torch; decoding_path says why). Returns the model."""
    model.fused_forward = FusedForward.for_model(model)
    return model


@contextlib.contextmanager
def torch_path(model):
    """Within the block, the model runs through torch and the library's kernels (to compare the two)."""
    fused, model.fused_forward = getattr(model, "fused_forward", None), None
    try:
        yield model
    finally:
        model.fused_forward = fused
