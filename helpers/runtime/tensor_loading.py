"""Build bigdl-llm low-bit RWKV-4 models one tensor at a time, with little more memory than the result.

bigdl-llm's ``from_pretrained`` loads the whole fp16 model, then converts each linear through an fp32
copy of it: its peak holds the fp16 model, the growing low-bit copy and fp32 temporaries (the 1.5B
head alone is 512 MiB in fp32). Here the model starts empty, on torch's meta device, and each tensor
of the checkpoint (safetensors, or the zip files of torch.save named pytorch_model.bin; fp16, bf16 or
fp32) is read at its offset in the file and quantized a few rows at a time by bigdl-llm's own
quantizer: the peak is the low-bit model plus one tensor of the checkpoint, and the low-bit bytes are
bigdl-llm's (a test checks that they are equal).

The low-bit weights share one buffer on transparent huge pages where Linux offers them: a decoding
step reads every weight once, and 2 MiB pages spare it a TLB miss every 4 KiB (2-4% of a 1.5B
token here). The low-bit cache that ``save_low_bit`` writes is memory-mapped rather than copied: its
pages are the page cache's, read once and shared.
"""
import contextlib
import ctypes
import io
import itertools
import json
import math
import mmap
import pickle
import struct
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from helpers.runtime.errors import UserError

SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
TORCH_STORAGE_DTYPES = {"HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16, "FloatStorage": torch.float32}
CHUNK_VALUES = 2**22  # weights read and quantized at once by each thread
PAGE = 4096
HUGE_PAGE = 2 * 1024 * 1024
ALIGNMENT = 64  # each low-bit weight starts on a cache line
RESCALED = {"attention": ["attention", "output", "weight"], "feed_forward": ["feed_forward", "value", "weight"]}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # each alone, or in shards listed by NAME.index.json


def weight_files(folder, single_name):
    """A checkpoint's files of one kind, in shard order: the shards its index lists, or the single file;
    empty when it has neither."""
    folder = Path(folder)
    index = folder / f"{single_name}.index.json"
    if index.exists():
        return [folder / name for name in dict.fromkeys(json.loads(index.read_text())["weight_map"].values())]
    return [folder / single_name] if (folder / single_name).exists() else []


def checkpoint_files(folder):
    """The checkpoint's weight files: safetensors where it has them, else torch's .bin; empty when neither."""
    return weight_files(folder, WEIGHT_FILES[0]) or weight_files(folder, WEIGHT_FILES[1])


@dataclass
class TensorEntry:
    dtype: torch.dtype
    shape: list
    offset: int  # of its first byte in the file


class TensorFile:
    """The tensors of one checkpoint file (safetensors, or torch.save's zip as in pytorch_model.bin), read
    with plain reads at their offsets rather than through a memory map, so that what a read brings in is
    freed with its tensor (a mapped file stays in the process's memory while open)."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            entries = _torch_zip_entries(self.path) if self.path.suffix == ".bin" else _safetensors_entries(self.path)
        except (OSError, ValueError, KeyError, struct.error, zipfile.BadZipFile, pickle.UnpicklingError) as error:
            raise UserError(f"{self.path} cannot be read as a checkpoint ({error}); download it again, or re-save it "
                            "with save_pretrained.") from None
        self.entries = dict(sorted(entries.items(), key=lambda item: item[1].offset))

    def read(self, name, first_row=0, rows=None, out=None):
        """Rows [first_row, first_row + rows) of a tensor (all of it by default), into `out` if given."""
        entry = self.entries[name]
        if out is None:
            out = torch.empty(entry.shape if rows is None else [rows, *entry.shape[1:]], dtype=entry.dtype)
        row_bytes = math.prod(entry.shape[1:]) * entry.dtype.itemsize
        target = memoryview(out.view(-1).view(torch.uint8).numpy())
        with open(self.path, "rb", buffering=0) as file:  # a file of its own: threads read at once
            file.seek(entry.offset + first_row * row_bytes)
            while target.nbytes:
                count = file.readinto(target)
                if not count:
                    raise UserError(f"{self.path} is truncated (at {name}); download or rebuild the checkpoint.")
                target = target[count:]
        return out


def _safetensors_entries(path):
    with open(path, "rb") as file:
        (header_size,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(header_size))
    header.pop("__metadata__", None)
    entries = {}
    for name, entry in header.items():
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise UserError(f"{path} holds {name} as {entry['dtype']}; expected fp16, bf16 or fp32 weights.")
        entries[name] = TensorEntry(SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"],
                                    8 + header_size + entry["data_offsets"][0])
    return entries


class _StateDictIndex(pickle.Unpickler):
    """Unpickles the data.pkl of a torch.save zip into {name: (storage key, dtype, byte offset, shape)},
    reading no tensor data and allowing only what a state dict of tensors holds: unlike torch.load, no
    code from the file runs."""

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self.tensor
        if module == "torch" and name in TORCH_STORAGE_DTYPES:
            return TORCH_STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"it holds {module}.{name}, not only fp16, bf16 or fp32 tensors")

    def persistent_load(self, saved_id):
        _, dtype, key, _location, _numel = saved_id  # ("storage", storage class, key, location, numel)
        return key, dtype

    @staticmethod
    def tensor(storage, storage_offset, shape, stride, *_):
        key, dtype = storage
        contiguous = [math.prod(shape[i + 1:]) for i in range(len(shape))]
        if list(stride) != contiguous and math.prod(shape) > 1:
            raise pickle.UnpicklingError("a tensor is stored non-contiguously; re-save it with save_pretrained")
        return key, dtype, storage_offset * dtype.itemsize, list(shape)


def _torch_zip_entries(path):
    """Entries of a file written by torch.save in its zip format: each storage is stored uncompressed as
    <archive>/data/<key>, and <archive>/data.pkl pickles the tensors over them."""
    with zipfile.ZipFile(path) as archive:
        pickled = next((name for name in archive.namelist() if name.endswith("/data.pkl")), None)
        if pickled is None:
            raise ValueError("no data.pkl: torch's legacy format? re-save it with save_pretrained")
        prefix = pickled[:-len("data.pkl")]
        state_dict = _StateDictIndex(io.BytesIO(archive.read(pickled))).load()
        entries = {}
        with open(path, "rb") as file:
            for name, (key, dtype, offset, shape) in state_dict.items():
                info = archive.getinfo(f"{prefix}data/{key}")
                if info.compress_type != zipfile.ZIP_STORED:
                    raise ValueError(f"{name} is compressed")
                file.seek(info.header_offset)  # a local file header: 30 bytes, then its name and extra field
                name_length, extra_length = struct.unpack("<26xHH", file.read(30))
                entries[name] = TensorEntry(dtype, shape, info.header_offset + 30 + name_length + extra_length + offset)
    return entries


def huge_page_buffer(nbytes):
    """An uninitialised uint8 tensor of nbytes, on transparent huge pages where the system allows them
    (Linux, THP "always" or "madvise"); elsewhere on ordinary pages."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(nbytes, dtype=torch.uint8)
    size = max(HUGE_PAGE, -(-nbytes // HUGE_PAGE) * HUGE_PAGE)  # whole huge pages: Linux then aligns the mapping
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # a kernel built without THP: ordinary pages
        region.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(region, dtype=torch.uint8)[:nbytes]  # the tensor keeps the mapping alive


def low_bit_bytes(linear):
    """Bytes of a LowBitLinear's weight blocks."""
    import bigdl.llm.ggml.model.llama.llama_cpp as ggml

    rows, cols = linear.weight_shape
    return rows * (cols // ggml.ggml_qk_size(linear.qtype) * ggml.ggml_type_size(linear.qtype))


def low_bit_weight_buffers(model):
    """{weight name: uint8 tensor} for every LowBitLinear of the model, consecutive slices of one huge-page
    buffer in the order the model reads them."""
    from bigdl.llm.transformers.low_bit_linear import LowBitLinear

    sizes = {f"{name}.weight": low_bit_bytes(module) for name, module in model.named_modules()
             if isinstance(module, LowBitLinear)}
    spans = [-(-size // ALIGNMENT) * ALIGNMENT for size in sizes.values()]
    buffer = huge_page_buffer(sum(spans))
    starts = itertools.accumulate(spans, initial=0)
    return {name: buffer[start:start + size] for (name, size), start in zip(sizes.items(), starts)}


def quantize(checkpoint, name, qtype, divisor, buffers, pool, blocks):
    """Fill `blocks` with bigdl-llm's low-bit blocks of a [rows, cols] weight of the checkpoint, divided by
    `divisor` first (in its own dtype, as transformers' rescale does). Each thread of the pool reads and
    quantizes a share of the rows, a chunk at a time through its pair of buffers (raw bytes, fp32);
    bigdl-llm's quantizer is a C function, so they run in parallel."""
    import bigdl.llm.ggml.model.llama.llama_cpp as ggml

    rows, cols = checkpoint.entries[name].shape
    row_bytes = blocks.numel() // rows
    step = max(1, CHUNK_VALUES // cols)

    def quantize_share(thread):
        raw, values = buffers[thread]
        for start in range(thread * step, rows, len(buffers) * step):
            count = min(step, rows - start) * cols
            chunk = checkpoint.read(name, start, count // cols, raw.view(checkpoint.entries[name].dtype)[:count])
            if divisor > 1:
                chunk.div_(divisor)
            values[:count].copy_(chunk)
            ggml.ggml_quantize_tensor(ctypes.cast(values.data_ptr(), ctypes.POINTER(ctypes.c_float)),
                                      ctypes.c_void_p(blocks.data_ptr() + start * row_bytes), qtype, count,
                                      cols, (ctypes.c_int64 * 16)())

    list(pool.map(quantize_share, range(len(buffers))))
    return blocks


@contextlib.contextmanager
def _skipped_init():
    """No random initialisation while the empty model is built (on meta tensors it only costs time)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "ones_", "zeros_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    for name in names:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def empty_low_bit_model(config_folder, low_bit):
    """The RWKV-4 model of the folder's config on the meta device, its linears bigdl-llm LowBitLinears."""
    from bigdl.llm.ggml.quantize import ggml_tensor_qtype
    from bigdl.llm.transformers.convert import ggml_convert_low_bit
    from bigdl.llm.transformers.model import save_low_bit
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_utils import no_init_weights

    config = AutoConfig.from_pretrained(config_folder)
    with torch.device("meta"), no_init_weights(), _skipped_init():
        model = AutoModelForCausalLM.from_config(config)
        model = ggml_convert_low_bit(model, ggml_tensor_qtype[low_bit], optimize_model=False, device="meta")
    model.config.update({"bigdl_transformers_low_bit": low_bit, "tie_word_embeddings": False})
    model.save_low_bit = save_low_bit.__get__(model, type(model))
    return model


def _rescale_divisor(name, config, rescale):
    """2 ** (layer // rescale_every) for the weights transformers' _rescale_layers divides, else 1."""
    parts = name.split(".")  # rwkv.blocks.<layer>.attention.output.weight
    if not rescale or config.rescale_every <= 0 or parts[3:] not in (RESCALED["attention"], RESCALED["feed_forward"]):
        return 1
    return 2 ** (int(parts[2]) // config.rescale_every)


def _low_bit_linear(model, name):
    """The LowBitLinear whose weight is called `name`, or None."""
    from bigdl.llm.transformers.low_bit_linear import LowBitLinear

    module_name, _, field = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    return module if isinstance(module, LowBitLinear) and field == "weight" else None


def _check_shape(label, name, shape, expected):
    if list(shape) != list(expected):
        raise UserError(f"{label}: {name} has shape {list(shape)}, but its config.json makes it {list(expected)}; "
                        "is the checkpoint complete?")


def _place(model, name, tensor, label):
    """Put a tensor into the empty model as the parameter `name` (a low-bit linear's blocks become its
    FP4Params). Raises UserError for a name that the model has no place for."""
    from bigdl.llm.transformers.low_bit_linear import FP4Params, LowBitLinear

    module_name, _, field = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        module = None
    if module is None or field not in module._parameters:
        raise UserError(f"{label} holds {name!r}, which RWKV-4 has no place for; is it an RWKV-4 checkpoint?")
    if isinstance(module, LowBitLinear) and field == "weight":
        module._parameters[field] = FP4Params(tensor, quantized=True, _shape=module.weight_shape, qtype=module.qtype)
    else:
        _check_shape(label, name, tensor.shape, module._parameters[field].shape)
        module._parameters[field] = torch.nn.Parameter(tensor, requires_grad=False)


def _check_complete(model, label):
    missing = [name for name, parameter in model.named_parameters() if parameter.is_meta]
    if missing:
        raise UserError(f"{label} lacks {len(missing)} tensors (first: {missing[0]}); download or rebuild it.")
    return model.eval()


def quantized_from_checkpoint(folder, low_bit, rescale=True):
    """The low-bit model of a local checkpoint folder, read tensor by tensor (see the module doc).

    rescale=True divides the output weights before quantizing, as bigdl-llm's optimize_model=True does.
    """
    model = empty_low_bit_model(folder, low_bit)
    weight_buffers = low_bit_weight_buffers(model)
    files = [TensorFile(path) for path in checkpoint_files(folder)]
    widest = max(entry.shape[-1] for file in files for entry in file.entries.values() if entry.shape)
    threads = torch.get_num_threads()
    buffers = [(torch.empty(4 * max(CHUNK_VALUES, widest), dtype=torch.uint8), torch.empty(max(CHUNK_VALUES, widest)))
               for _ in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        for checkpoint in files:
            for name in checkpoint.entries:
                linear = _low_bit_linear(model, name)
                if linear:
                    _check_shape(folder, name, checkpoint.entries[name].shape, linear.weight_shape)
                    divisor = _rescale_divisor(name, model.config, rescale)
                    tensor = quantize(checkpoint, name, linear.qtype, divisor, buffers, pool, weight_buffers[name])
                else:
                    tensor = checkpoint.read(name)
                _place(model, name, tensor, str(folder))
    model.rwkv.layers_are_rescaled = rescale
    return _check_complete(model, str(folder))


def mapped_low_bit_cache(folder, low_bit):
    """A model saved by save_low_bit, its pytorch_model.bin (or shards) memory-mapped and read in once.

    save_low_bit is only ever called on rescaled weights, as bigdl-llm's load_low_bit assumes too.
    """
    model = empty_low_bit_model(folder, low_bit)
    for path in weight_files(folder, WEIGHT_FILES[1]):
        for name, tensor in torch.load(path, mmap=True, weights_only=True, map_location="cpu").items():
            _place(model, name, _read_in(tensor), str(folder))
    model.rwkv.layers_are_rescaled = True
    return _check_complete(model, str(folder))


def _read_in(tensor):
    """Touch one byte per page, so the mapped tensor is in memory now rather than at the first token."""
    if tensor.numel():
        tensor.view(-1).view(torch.uint8)[::PAGE].sum()
    return tensor
