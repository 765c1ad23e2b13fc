"""Load RWKV-4 as HF transformers reference models or as bigdl-llm low-bit models that run on CPU.

Every low-bit path (this project's tensor-by-tensor loader and bigdl-llm's ``from_pretrained(load_in_4bit /
load_in_low_bit)``, ``optimize_model()`` and ``load_low_bit``) goes through ``repair_for_cpu``; see
helpers.rwkv_cpu for why.
"""
import logging
import shutil

import torch
from bigdl.llm.transformers import AutoModelForCausalLM as LowBitModel  # after helpers chose the native library

from helpers.cpu import require_avx2
from helpers.errors import UserError
from helpers.memory import check_fits
from helpers.paths import MODELS_DIR
from helpers.rwkv_cpu import release_freed_memory, repair_for_cpu
from helpers.tensor_loading import mapped_low_bit_cache, quantized_from_checkpoint, safetensors_files

logging.getLogger().setLevel(logging.WARNING)  # bigdl-llm sets the root logger to INFO on import

LOW_BIT_FORMATS = ("sym_int4", "asym_int4", "sym_int5", "sym_int8")
CACHE_DIR = MODELS_DIR / "low-bit"


def _check_low_bit(low_bit):
    if low_bit not in LOW_BIT_FORMATS:
        raise UserError(f"Unknown low-bit format {low_bit!r}; choose one of {', '.join(LOW_BIT_FORMATS)}.")
    require_avx2()


def load_tokenizer(source):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.location, trust_remote_code=True)


def load_hf_model(source, dtype=torch.float32):
    """The plain transformers model, the reference every low-bit result is compared with."""
    from transformers import AutoModelForCausalLM

    check_fits(source.config, {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype])
    model = AutoModelForCausalLM.from_pretrained(source.location, torch_dtype=dtype)
    return model.eval()


def load_low_bit_model(source, low_bit="sym_int4", optimize_model=True, loader="tensor_by_tensor"):
    """The low-bit model of an fp16 checkpoint, repaired for CPU.

    loader="tensor_by_tensor" reads a local safetensors checkpoint one tensor at a time and quantizes it
    with bigdl-llm's own quantizer (helpers.tensor_loading): the weights of bigdl-llm's from_pretrained,
    at a fraction of its peak memory. loader="from_pretrained" calls bigdl-llm's
    ``from_pretrained(load_in_low_bit=...)`` (load_in_4bit is the same as sym_int4), which other
    checkpoints (.bin files, hub ids) always use. optimize_model=True divides the layers' output weights
    as bigdl-llm does; False scales the layer outputs instead.
    A folder written by save_low_bit keeps the format it was saved in and loads as a low-bit cache.
    """
    saved_format = source.config.get("bigdl_transformers_low_bit")
    if saved_format:
        return _load_saved_low_bit(source.location, source.config, saved_format)
    _check_low_bit(low_bit)
    if loader not in ("tensor_by_tensor", "from_pretrained"):
        raise UserError(f"Unknown loader {loader!r}; choose 'tensor_by_tensor' or 'from_pretrained'.")
    if loader == "tensor_by_tensor" and safetensors_files(source.location):
        check_fits(source.config, low_bit, tensor_by_tensor=True)
        return repair_for_cpu(quantized_from_checkpoint(source.location, low_bit, rescale=optimize_model))
    check_fits(source.config, low_bit)
    model = LowBitModel.from_pretrained(
        source.location, load_in_low_bit=low_bit, optimize_model=optimize_model, trust_remote_code=True
    )
    return repair_for_cpu(model)


def optimize_hf_model(model, low_bit="sym_int4"):
    """bigdl-llm's one-line API on a transformers model, as the upstream example uses it."""
    _check_low_bit(low_bit)
    from bigdl.llm import optimize_model

    return repair_for_cpu(optimize_model(model, low_bit=low_bit))


def cache_dir(source, low_bit):
    return CACHE_DIR / f"{source.name}-{low_bit}"


def load_cached_low_bit_model(source, low_bit="sym_int4", loader="mapped"):
    """Convert once with save_low_bit into data/models/low-bit/, then load that folder.

    loader="mapped" memory-maps its weights (helpers.tensor_loading); "load_low_bit" calls bigdl-llm's.
    """
    folder = cache_dir(source, low_bit)
    if not (folder / "config.json").exists():
        model = load_low_bit_model(source, low_bit)
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_low_bit(str(partial))
        load_tokenizer(source).save_pretrained(str(partial))
        shutil.rmtree(folder, ignore_errors=True)  # an unfinished copy, if any
        partial.rename(folder)
        del model
        release_freed_memory()
    return _load_saved_low_bit(folder, source.config, low_bit, loader)


def _load_saved_low_bit(folder, config, low_bit, loader="mapped"):
    _check_low_bit(low_bit)
    if loader not in ("mapped", "load_low_bit"):
        raise UserError(f"Unknown loader {loader!r}; choose 'mapped' or 'load_low_bit'.")
    check_fits(config, low_bit, from_cache=True)
    if loader == "mapped":
        return repair_for_cpu(mapped_low_bit_cache(folder, low_bit))
    return repair_for_cpu(LowBitModel.load_low_bit(str(folder), trust_remote_code=True))


def load_model(source, low_bit="sym_int4"):
    """The HF fp32 reference for low_bit="fp32", else the bigdl-llm low-bit model repaired for CPU."""
    return load_hf_model(source) if low_bit == "fp32" else load_low_bit_model(source, low_bit)
