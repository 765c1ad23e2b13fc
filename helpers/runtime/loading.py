"""Load RWKV-4 as HF transformers reference models or as low-bit models of bigdl-llm (or ipex-llm) that run on CPU.

Every low-bit path (this project's tensor-by-tensor loader and the library's ``from_pretrained(load_in_4bit /
load_in_low_bit)``, ``optimize_model()`` and ``load_low_bit``) goes through ``repair_for_cpu`` (see
helpers.runtime.rwkv_cpu for why), then ``use_fused_step``. ``load_model``, what the CLI, notebooks and playground
call, converts a model once into a low-bit cache (data/models/low-bit/) and loads it from there afterwards.
"""
import logging
import pickle
import time

import torch

from helpers.runtime import fused_decode, library
from helpers.runtime.cpu import require_avx2
from helpers.runtime.errors import UserError
from helpers.runtime.formats import CHOICES, MIXES, body_and_head
from helpers.runtime.low_bit_cache import cache_dir, cache_enabled, cache_problem, save_cache, shown_path
from helpers.runtime.memory import check_fits
from helpers.runtime.rwkv_cpu import release_freed_memory, repair_for_cpu
from helpers.runtime.startup import start
from helpers.runtime.tensor_loading import mapped_low_bit_cache, quantized_from_checkpoint


def _low_bit_model_class():
    """The library's AutoModelForCausalLM, imported on first use: after start() chose the native library."""
    auto_model = library.module("transformers").AutoModelForCausalLM
    logging.getLogger().setLevel(logging.WARNING)  # the library sets the root logger to INFO on import
    return auto_model


def _check_low_bit(low_bit):
    """UserError for a format the library has no kernel for here; then the native library is chosen (once), as
    it must be before the library is first imported."""
    if low_bit not in CHOICES:
        raise UserError(f"Unknown low-bit format {low_bit!r}; choose one of {', '.join(CHOICES)}.")
    require_avx2()
    start()


def _for_cpu(model):
    """A low-bit model repaired for CPU, with the fused step where it runs."""
    return fused_decode.use_fused_step(repair_for_cpu(model))


def load_tokenizer(source):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.location, trust_remote_code=True)


def load_hf_model(source, dtype=torch.float32):
    """The plain transformers model, the reference every low-bit result is compared with."""
    from transformers import AutoModelForCausalLM

    check_fits(source.config, {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype], loader="from_pretrained")
    model = AutoModelForCausalLM.from_pretrained(source.location, torch_dtype=dtype)
    return model.eval()


def load_low_bit_model(source, low_bit="sym_int4", optimize_model=True, loader="tensor_by_tensor"):
    """The low-bit model of a checkpoint folder, repaired for CPU.

    loader="tensor_by_tensor" reads the checkpoint (safetensors or pytorch_model.bin, single or sharded)
    one tensor at a time and quantizes it with the library's own quantizer (helpers.runtime.tensor_loading): the
    weights of the library's from_pretrained, at a fraction of its peak memory. loader="from_pretrained" calls
    the library's ``from_pretrained(load_in_low_bit=...)`` (load_in_4bit is the same as sym_int4); for a mix,
    with the head left out, then converted alone by ``optimize_model``. optimize_model=True divides the layers'
    output weights as the library does; False scales the layer outputs instead. A folder written by save_low_bit
    keeps the format it was saved in.
    """
    saved_format = source.config.get("bigdl_transformers_low_bit")
    if saved_format:
        return _load_saved_low_bit(source.location, source.config, saved_format)
    _check_low_bit(low_bit)
    if loader not in ("tensor_by_tensor", "from_pretrained"):
        raise UserError(f"Unknown loader {loader!r}; choose 'tensor_by_tensor' or 'from_pretrained'.")
    check_fits(source.config, low_bit, loader)
    if loader == "tensor_by_tensor":
        return _for_cpu(quantized_from_checkpoint(source.location, low_bit, rescale=optimize_model))
    body, head = body_and_head(low_bit)
    model = _low_bit_model_class().from_pretrained(
        source.location, load_in_low_bit=body, optimize_model=optimize_model, trust_remote_code=True,
        modules_to_not_convert=["head"] if head != body else None,
    )
    if head != body:
        # converts what is still a torch Linear: the head
        model = library.module().optimize_model(model, low_bit=head, optimize_llm=False)
        model.config.update({"bigdl_transformers_low_bit": low_bit})
    return _for_cpu(model)


def _convert_into_cache(source, low_bit, folder):
    model = load_low_bit_model(source, low_bit)
    save_cache(model, source, folder)
    del model
    release_freed_memory()


def ensure_cache(source, low_bit="sym_int4", report=print, problem=None):
    """The model's low-bit cache folder (save_low_bit's layout, the tokenizer's files beside the weights), for
    the library's load_low_bit or load_cached_low_bit_model; converted and saved first where it is missing,
    unfinished or stale, or where `problem` says why it must be (it did not load), which report is told."""
    folder = cache_dir(source, low_bit)
    problem = problem or cache_problem(source, folder)
    if problem:
        start = time.perf_counter()
        _convert_into_cache(source, low_bit, folder)
        report(f"Converted {source.name} to {low_bit} in {time.perf_counter() - start:.1f} s ({problem}) and saved it "
               f"in {shown_path(folder)}.")
    return folder


def load_cached_low_bit_model(source, low_bit="sym_int4", loader="mapped", report=print):
    """Convert once with save_low_bit into data/models/low-bit/, then load that folder.

    A missing, unfinished, truncated or stale cache is (re)built. report (a function of one line of text)
    is told which happened and where. loader="mapped" memory-maps the weights (helpers.runtime.tensor_loading);
    "load_low_bit" calls the library's.
    """
    start, converted = time.perf_counter(), []
    folder = ensure_cache(source, low_bit, converted.append)
    try:
        model = _load_saved_low_bit(folder, source.config, low_bit, loader)
    except (RuntimeError, UserError, ValueError, EOFError, pickle.UnpicklingError) as error:  # right sizes, bad bytes
        if converted:
            raise
        ensure_cache(source, low_bit, converted.append, problem=f"the cache did not load: {error}")
        model = _load_saved_low_bit(folder, source.config, low_bit, loader)
    report(converted[0] if converted else
           f"Loaded {source.name} in {low_bit} from the cache in {shown_path(folder)} in {time.perf_counter() - start:.1f} s.")
    return model


def _load_saved_low_bit(folder, config, low_bit, loader="mapped"):
    _check_low_bit(low_bit)
    if loader not in ("mapped", "load_low_bit"):
        raise UserError(f"Unknown loader {loader!r}; choose 'mapped' or 'load_low_bit'.")
    check_fits(config, low_bit, "cache")
    if loader == "load_low_bit" and low_bit in MIXES:
        raise UserError(f"{library.name()}'s load_low_bit reads models in one format, and {low_bit} mixes two; "
                        "load it with loader='mapped'.")
    if loader == "mapped":
        return _for_cpu(mapped_low_bit_cache(folder, low_bit))
    return _for_cpu(_low_bit_model_class().load_low_bit(str(folder), trust_remote_code=True))


_decoding_path_reported = False


def load_model(source, low_bit="sym_int4", report=print):
    """What the CLI, notebooks and playground run: the HF fp32 reference for low_bit="fp32"; else the low-bit
    model repaired for CPU, from the low-bit cache (made on the first load) unless RWKV_LOW_BIT_CACHE=0.
    The first low-bit load of a process also reports which decoding path runs, and why when not the fused one."""
    global _decoding_path_reported
    if low_bit == "fp32":
        return load_hf_model(source)
    if cache_enabled() and not source.config.get("bigdl_transformers_low_bit"):
        model = load_cached_low_bit_model(source, low_bit, report=report)
    else:
        model = load_low_bit_model(source, low_bit)
    if not _decoding_path_reported:
        _decoding_path_reported = True
        report(f"Decoding: {fused_decode.decoding_path(model)}.")
    return model
