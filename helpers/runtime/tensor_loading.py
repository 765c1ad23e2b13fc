"""Build low-bit RWKV-4 models of bigdl-llm (or ipex-llm) one tensor at a time, with little more memory than the result.

bigdl-llm's ``from_pretrained`` loads the whole fp16 model, then converts each linear through an fp32
copy of it: its peak holds the fp16 model, the growing low-bit copy and fp32 temporaries (the 1.5B
head alone is 512 MiB in fp32). Here the model starts empty, on torch's meta device, and each tensor
of the checkpoint (safetensors, or the zip files of torch.save named pytorch_model.bin; fp16, bf16 or
fp32) is read at its offset in the file and quantized a few rows at a time by the library's own
quantizer: the peak is the low-bit model plus one tensor of the checkpoint, and the low-bit bytes are
the library's (a test checks that they are equal).

The low-bit weights share one buffer on transparent huge pages where Linux offers them: a decoding
step reads every weight once, and 2 MiB pages spare it a TLB miss every 4 KiB (2-4% of a 1.5B
token here). Parts that got 4 KiB pages when first written (memory full of page cache) are moved onto
huge pages once the model is loaded. A low-bit cache that ``save_low_bit`` wrote is memory-mapped, and its
low-bit weights are copied into the same kind of buffer, each one's mapped pages let go as soon as it is
copied: left on the page cache's 4 KiB pages they decoded up to 1.1x slower on the 1.5B and 7B shapes.
"""
import contextlib
import ctypes
import itertools
import mmap
from concurrent.futures import ThreadPoolExecutor

import torch

from helpers.runtime.checkpoint_files import WEIGHT_FILES, TensorFile, checkpoint_files, weight_files
from helpers.runtime.errors import UserError
from helpers.runtime import library
from helpers.runtime.formats import body_and_head

CHUNK_VALUES = 2**22  # weights read and quantized at once by each thread
PAGE = 4096
HUGE_PAGE = 2 * 1024 * 1024
MADV_COLLAPSE = 25  # Linux 6.1+ (Python 3.11's mmap lacks the name)
ALIGNMENT = 64  # each low-bit weight starts on a cache line
RESCALED = {"attention": ["attention", "output", "weight"], "feed_forward": ["feed_forward", "value", "weight"]}


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
    ggml = library.module(library.KERNELS)
    rows, cols = linear.weight_shape
    return rows * (cols // ggml.ggml_qk_size(linear.qtype) * ggml.ggml_type_size(linear.qtype))


def low_bit_weight_buffers(model):
    """{weight name: uint8 tensor} for every LowBitLinear of the model, consecutive slices of one huge-page
    buffer in the order the model reads them."""
    LowBitLinear = library.low_bit_linear().LowBitLinear
    sizes = {f"{name}.weight": low_bit_bytes(module) for name, module in model.named_modules()
             if isinstance(module, LowBitLinear)}
    spans = [-(-size // ALIGNMENT) * ALIGNMENT for size in sizes.values()]
    buffer = huge_page_buffer(sum(spans))
    starts = itertools.accumulate(spans, initial=0)
    return {name: buffer[start:start + size] for (name, size), start in zip(sizes.items(), starts)}


def quantize(checkpoint, name, qtype, divisor, buffers, pool, blocks):
    """Fill `blocks` with the library's low-bit blocks of a [rows, cols] weight of the checkpoint, divided by
    `divisor` first (in its own dtype, as transformers' rescale does). Each thread of the pool reads and
    quantizes a share of the rows, a chunk at a time through its pair of buffers (raw bytes, fp32);
    the library's quantizer is a C function, so they run in parallel."""
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
            library.quantize_tensor(values.data_ptr(), blocks.data_ptr() + start * row_bytes, qtype, count, cols)

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
    """The RWKV-4 model of the folder's config on the meta device, its linears the library's LowBitLinears (in a
    mix, the head in its own format: the library's converter skips the head, then converts it alone)."""
    ggml_tensor_qtype = library.module("ggml.quantize").ggml_tensor_qtype
    ggml_convert_low_bit = library.module("transformers.convert").ggml_convert_low_bit
    save_low_bit = library.module("transformers.model").save_low_bit
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_utils import no_init_weights

    config = AutoConfig.from_pretrained(config_folder)
    body, head = body_and_head(low_bit)
    with torch.device("meta"), no_init_weights(), _skipped_init():
        model = AutoModelForCausalLM.from_config(config)
        model = ggml_convert_low_bit(model, ggml_tensor_qtype[body], optimize_model=False, device="meta",
                                     modules_to_not_convert=["head"] if head != body else None)
        if head != body:  # the converter replaces only what is still a torch Linear
            model = ggml_convert_low_bit(model, ggml_tensor_qtype[head], optimize_model=False, device="meta")
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
    LowBitLinear = library.low_bit_linear().LowBitLinear
    module_name, _, field = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    return module if isinstance(module, LowBitLinear) and field == "weight" else None


def _expected_shapes(model):
    """{parameter name: the shape config.json gives its checkpoint tensor} of the empty model (a low-bit
    linear's weight: its shape before quantizing)."""
    LowBitLinear = library.low_bit_linear().LowBitLinear
    return {f"{module_name}.{field}": list(module.weight_shape if isinstance(module, LowBitLinear) and field == "weight"
                                           else parameter.shape)
            for module_name, module in model.named_modules() for field, parameter in module._parameters.items()
            if parameter is not None}


def _no_place(label, name):
    return UserError(f"{label} holds {name!r}, which RWKV-4 has no place for; is it an RWKV-4 checkpoint?")


def _check_shape(label, name, shape, expected):
    if list(shape) != list(expected):
        raise UserError(f"{label}: {name} has shape {list(shape)}, but its config.json makes it {list(expected)}; "
                        "is the checkpoint complete?")


def _refuse_missing(label, missing):
    if missing:
        raise UserError(f"{label} lacks {len(missing)} tensors (first: {missing[0]}); download or rebuild it.")


def _check_against_model(files, model, label):
    """Refuse, before anything is allocated or read, a checkpoint whose tensors are not the model's: a tensor the
    model has no place for, of another shape than config.json gives it, held twice, or missing."""
    expected, held_in = _expected_shapes(model), {}
    for checkpoint in files:
        for name, entry in checkpoint.entries.items():
            if name not in expected:
                raise _no_place(label, name)
            if name in held_in:
                raise UserError(f"{label} holds {name} twice (in {held_in[name].name} and {checkpoint.path.name}); "
                                "download or rebuild it.")
            _check_shape(label, name, entry.shape, expected[name])
            held_in[name] = checkpoint.path
    if not held_in:
        raise UserError(f"{label} holds no tensors; download or rebuild it.")
    _refuse_missing(label, [name for name in expected if name not in held_in])


def _place(model, name, tensor, label):
    """Put a tensor into the empty model as the parameter `name` (a low-bit linear's blocks become its
    FP4Params). Raises UserError for a name that the model has no place for."""
    FP4Params, LowBitLinear = library.low_bit_linear().FP4Params, library.low_bit_linear().LowBitLinear
    module_name, _, field = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        module = None
    if module is None or field not in module._parameters:
        raise _no_place(label, name)
    if isinstance(module, LowBitLinear) and field == "weight":
        module._parameters[field] = FP4Params(tensor, quantized=True, _shape=module.weight_shape, qtype=module.qtype)
    else:
        _check_shape(label, name, tensor.shape, module._parameters[field].shape)
        module._parameters[field] = torch.nn.Parameter(tensor, requires_grad=False)


def _check_complete(model, label):
    _refuse_missing(label, [name for name, parameter in model.named_parameters() if parameter.is_meta])
    return model.eval()


def quantized_from_checkpoint(folder, low_bit, rescale=True):
    """The low-bit model of a local checkpoint folder, read tensor by tensor (see the module doc). Every
    tensor's place and shape are checked against config.json before anything is allocated or read, so what
    is allocated follows from the config, and every tensor lies inside its file (helpers.runtime.checkpoint_files).

    rescale=True divides the output weights before quantizing, as the library's optimize_model=True does.
    """
    files = [TensorFile(path) for path in checkpoint_files(folder)]
    model = empty_low_bit_model(folder, low_bit)
    _check_against_model(files, model, str(folder))
    weight_buffers = low_bit_weight_buffers(model)
    widest = max(entry.shape[-1] for file in files for entry in file.entries.values() if entry.shape)
    threads = torch.get_num_threads()
    buffers = [(torch.empty(4 * max(CHUNK_VALUES, widest), dtype=torch.uint8), torch.empty(max(CHUNK_VALUES, widest)))
               for _ in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        for checkpoint in files:
            for name in checkpoint.entries:
                linear = _low_bit_linear(model, name)
                if linear:
                    divisor = _rescale_divisor(name, model.config, rescale)
                    tensor = quantize(checkpoint, name, linear.qtype, divisor, buffers, pool, weight_buffers[name])
                else:
                    tensor = checkpoint.read(name)
                _place(model, name, tensor, str(folder))
    settle_on_huge_pages(weight_buffers)
    model.rwkv.layers_are_rescaled = rescale
    return _check_complete(model, str(folder))


def mapped_low_bit_cache(folder, low_bit):
    """A model saved by save_low_bit: its pytorch_model.bin (or shards) memory-mapped, each low-bit weight copied
    into the huge-page buffer and its mapped pages released behind it (the peak stays about the model's size),
    the other tensors read in where they are mapped.

    save_low_bit is only ever called on rescaled weights, as the library's load_low_bit assumes too.
    """
    model = empty_low_bit_model(folder, low_bit)
    weight_buffers = low_bit_weight_buffers(model)
    for path in weight_files(folder, WEIGHT_FILES[1]):
        for name, tensor in torch.load(path, mmap=True, weights_only=True, map_location="cpu").items():
            if name in weight_buffers:
                tensor = _copied_into(weight_buffers[name], tensor, f"{folder}: {name}")
            else:
                tensor = _read_in(tensor)
            _place(model, name, tensor, str(folder))
    settle_on_huge_pages(weight_buffers)
    model.rwkv.layers_are_rescaled = True
    return _check_complete(model, str(folder))


def _copied_into(buffer, mapped, label):
    """buffer, holding a copy of the mapped tensor's bytes; the whole pages of the mapping under them are let go."""
    source = mapped.reshape(-1).view(torch.uint8)
    if source.numel() != buffer.numel():
        raise UserError(f"{label} holds {source.numel()} bytes where its format has {buffer.numel()}; the cache is damaged.")
    buffer.copy_(source)
    if hasattr(mmap, "MADV_DONTNEED"):  # the mapping is read-only in practice: its pages come back from the file
        first = -(-source.data_ptr() // PAGE) * PAGE
        end = (source.data_ptr() + source.numel()) // PAGE * PAGE
        if end > first:
            _madvise(first, end - first, mmap.MADV_DONTNEED)
    return buffer


def settle_on_huge_pages(weight_buffers):
    """Move the parts of the weights' huge-page buffer that got 4 KiB pages when first written (no free 2 MiB
    block then: memory full of page cache, say) onto huge pages now, compacting memory as needed (Linux 6.1
    and newer; elsewhere, or when no memory can be found, the buffer stays as it is)."""
    storage = next(iter(weight_buffers.values())).untyped_storage()
    if hasattr(mmap, "MADV_HUGEPAGE") and storage.nbytes() % HUGE_PAGE == 0:  # else not huge_page_buffer's
        _madvise(storage.data_ptr(), storage.nbytes(), MADV_COLLAPSE)


def _madvise(address, length, advice):
    """Linux's madvise on any address range (Python's mmap offers it only on its own maps); errors are ignored."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise(address, length, advice)


def _read_in(tensor):
    """Touch one byte per page, so the mapped tensor is in memory now rather than at the first token."""
    if tensor.numel():
        tensor.view(-1).view(torch.uint8)[::PAGE].sum()
    return tensor
