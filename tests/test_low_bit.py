"""The CPU INT4 path: every loading API of the low-bit library (bigdl-llm or ipex-llm) runs on CPU and stays close to HF fp32."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import run_cli
from helpers.runtime import fused_decode, library
from helpers.runtime.formats import LOW_BIT_FORMATS
from helpers.runtime.loading import load_low_bit_model, load_model
from helpers.lessons.quality import agreement, logits_for
from helpers.runtime.low_bit_cache import cache_dir


@pytest.fixture(scope="module")
def reference_logits(fp32_model, input_ids):
    return logits_for(fp32_model, input_ids)


@pytest.mark.parametrize("low_bit", LOW_BIT_FORMATS)
def test_format_agrees_with_fp32(tiny_source, input_ids, reference_logits, low_bit):
    logits = logits_for(load_low_bit_model(tiny_source, low_bit), input_ids)
    assert torch.isfinite(logits).all()
    result = agreement(reference_logits, logits)
    assert result.above_floor(low_bit), result


def test_upstream_forwards_fail_on_cpu_without_the_repair(tiny_source, input_ids):
    auto_model = library.module("transformers").AutoModelForCausalLM
    gpu_module = {"bigdl-llm": "linear_q4_0", "ipex-llm": "xe_linear"}[library.name()]
    for optimize_model, error, message in ((True, ModuleNotFoundError, gpu_module), (False, RuntimeError, "can't be cast")):
        model = auto_model.from_pretrained(tiny_source.location, load_in_4bit=True,
                                                     optimize_model=optimize_model)
        with pytest.raises(error, match=message):
            logits_for(model, input_ids)


def test_load_in_4bit_and_optimize_model_false_match(tiny_source, input_ids, sym_int4_logits):
    # Without bigdl's optimizations the layers are not rescaled in the weights: the repair
    # rescales the outputs instead, by powers of two, so the result is the same.
    unoptimized = load_low_bit_model(tiny_source, "sym_int4", optimize_model=False)
    assert torch.allclose(logits_for(unoptimized, input_ids), sym_int4_logits, atol=1e-4)


def test_optimize_model_api_matches(tiny_source, input_ids, sym_int4_logits):
    from transformers import AutoModelForCausalLM

    from helpers.runtime.rwkv_cpu import repair_for_cpu

    model = AutoModelForCausalLM.from_pretrained(tiny_source.location, torch_dtype=torch.float16)
    model = fused_decode.use_fused_step(repair_for_cpu(library.module().optimize_model(model)))
    assert torch.allclose(logits_for(model, input_ids), sym_int4_logits, atol=1e-4)


def test_the_repair_file_runs_on_its_own(tiny_source, input_ids, tmp_path):
    """rwkv_cpu.py copied beside a script, with every import of the project failing and none of the variables
    start() sets: the library's load_in_4bit model, repaired, gives the logits of the torch path in process."""
    from helpers.runtime import rwkv_cpu

    shutil.copy(rwkv_cpu.__file__, tmp_path)
    script = f"""
import sys
sys.modules["helpers"] = None  # importing anything of the project fails
import torch
from {library.package()}.transformers import AutoModelForCausalLM
from rwkv_cpu import repair_for_cpu

model = AutoModelForCausalLM.from_pretrained({str(tiny_source.location)!r}, load_in_4bit=True, trust_remote_code=True)
with torch.inference_mode():
    torch.save(repair_for_cpu(model)(torch.tensor({input_ids.tolist()})).logits, "logits.pt")
"""
    env = {name: value for name, value in os.environ.items() if name not in library.import_variables()}
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, check=True, capture_output=True, env=env)
    with fused_decode.torch_path(load_low_bit_model(tiny_source, "sym_int4")) as model:
        expected = logits_for(model, input_ids)
    assert torch.allclose(torch.load(tmp_path / "logits.pt"), expected, atol=1e-4)


def test_the_first_load_says_which_path_decodes(tiny_source, cache_here, monkeypatch):
    monkeypatch.setattr("helpers.runtime.loading._decoding_path_reported", False)
    model = load_model(tiny_source, report=cache_here.append)
    load_model(tiny_source, report=cache_here.append)
    said = [line for line in cache_here if line.startswith("Decoding: ")]
    if model.fused_forward is not None:
        build = fused_decode.kernel_name(model.fused_forward.native)
        assert said == [f"Decoding: helpers' fused step, its {build} build (compiled for this CPU)."]
    else:  # the torch path: it says why
        assert said == [f"Decoding: {library.name()}'s kernels through torch (slower than the fused step): "
                        f"{fused_decode.unavailable_reason}."]
    monkeypatch.setenv("RWKV_LOW_BIT_CACHE", "1")
    load_model(tiny_source, report=cache_here.append)
    assert cache_here[0].startswith("Converted") and cache_dir(tiny_source, "sym_int4").exists()


def test_no_fp16_view_of_the_checkpoint_remains(tiny_source):
    from helpers.runtime.rwkv_cpu import HalfEmbedding

    LowBitLinear = library.low_bit_linear().LowBitLinear
    model = load_low_bit_model(tiny_source, "sym_int4")
    assert isinstance(model.rwkv.embeddings, HalfEmbedding) and model.rwkv.embeddings.weight.dtype == torch.float16
    for name, module in model.named_modules():
        if not isinstance(module, (LowBitLinear, HalfEmbedding)):
            for param_name, param in module.named_parameters(recurse=False):
                assert param.dtype == torch.float32, f"{name}.{param_name} is {param.dtype}"


def greedy_output(threads):
    result = run_cli("helpers.tools.generate", "--n-predict", "24", env={"OMP_NUM_THREADS": str(threads)})
    assert result.returncode == 0, result.stderr
    return result.stdout.split("-------------------- Output --------------------\n")[1]


@pytest.mark.library_independent
def test_greedy_output_is_reproducible_across_runs_and_threads():
    assert greedy_output(2) == greedy_output(1)


def test_cpu_forwards_compute_the_transformers_maths(tiny_source, input_ids, reference_logits):
    from helpers.runtime.loading import load_hf_model
    from helpers.runtime.rwkv_cpu import repair_for_cpu

    model = repair_for_cpu(load_hf_model(tiny_source))  # fp32 linears: only the forwards differ
    assert torch.allclose(logits_for(model, input_ids), reference_logits, atol=1e-4)


def test_token_by_token_decoding_matches_the_whole_sequence(tiny_source, input_ids, reference_logits):
    from helpers.runtime.loading import load_hf_model
    from helpers.runtime.rwkv_cpu import repair_for_cpu

    # Exact maths with fp32 linears; in INT4 ggml's one-row and many-row kernels round differently.
    for model, tolerance in ((repair_for_cpu(load_hf_model(tiny_source)), 1e-4), (load_low_bit_model(tiny_source), 0.5)):
        whole = logits_for(model, input_ids)
        with torch.inference_mode():
            out = model(input_ids[:, :8], use_cache=True)
            logits = [out.logits[0]]
            for position in range(8, input_ids.shape[1]):
                out = model(input_ids[:, position:position + 1], state=out.state, use_cache=True)
                logits.append(out.logits[0])
        stepwise = torch.cat(logits)
        assert (stepwise - whole).abs().max() < tolerance
        assert agreement(whole, stepwise).cosine > 0.999


@pytest.mark.parametrize("low_bit", LOW_BIT_FORMATS)
def test_weight_bytes_estimate_matches_the_loaded_model(tiny_source, low_bit):
    from helpers.runtime.memory import model_weight_bytes, weight_bytes

    model = load_low_bit_model(tiny_source, low_bit)
    actual = model_weight_bytes(model)
    assert actual == pytest.approx(weight_bytes(tiny_source.config, low_bit), rel=0.01)
