"""The native decoding step (helpers/runtime/rwkv4_decode.c) computes what the torch path computes."""
import contextlib
import json
import subprocess
import sys

import pytest
import torch

from conftest import SAMPLE_TEXTS
from helpers.quality import agreement, stepwise_logits
from helpers.runtime import fused_decode
from helpers.runtime.cpu import cpu_info
from helpers.runtime.loading import load_low_bit_model
from helpers.runtime.paths import REPO_ROOT

needs_vnni = pytest.mark.skipif(not cpu_info().has(*fused_decode.NEEDED_FLAGS), reason="CPU lacks AVX-512 VNNI")
needs_fused_step = pytest.mark.skipif(fused_decode.library() is None, reason=str(fused_decode.unavailable_reason))


@pytest.fixture(scope="module")
def input_ids(tokenizer):
    return tokenizer("\n".join(SAMPLE_TEXTS.values()), return_tensors="pt").input_ids


def decode_steps(model, input_ids, fused):
    """(logits, state) of reading input_ids token by token after an 8-token prompt, fused or not."""
    with contextlib.nullcontext() if fused else fused_decode.torch_path(model):
        run = stepwise_logits(model, input_ids)
    return run.logits, run.state


@needs_vnni
@pytest.mark.parametrize("gfni", [True, False])
def test_kernel_matches_bigdl_int4_matmul(gfni):
    from bigdl.llm.transformers.low_bit_linear import ggml_convert_qtype, ggml_matmul_src1_x_src0_t, ggml_tensor_qtype

    if gfni and not cpu_info().has("gfni"):
        pytest.skip("CPU lacks GFNI")
    native = fused_decode.load_library(() if gfni else ("-mno-gfni",))
    qtype = ggml_tensor_qtype["sym_int4"]
    generator = torch.Generator().manual_seed(0)
    for rows, cols, tokens in ((256, 256, 1), (1024, 4096, 1), (4096, 1024, 1), (512, 1024, 3), (256, 1024, 5), (1024, 256, 8), (512, 256, 20)):
        weight = ggml_convert_qtype(torch.randn(rows, cols, generator=generator), qtype)
        x = torch.randn(tokens, cols, generator=generator)
        expected = ggml_matmul_src1_x_src0_t(weight, x, torch.Size([rows, cols]), qtype)
        for threads in (1, 2):
            y = torch.empty(max(tokens, (tokens + 7) // 8 * 8), rows)  # room for the kernel's padding tokens
            native.rwkv4_matmul(weight.data_ptr(), rows, cols, x.data_ptr(), tokens, y.data_ptr(), threads)
            assert torch.allclose(y[:tokens], expected, rtol=1e-4, atol=1e-3 * expected.abs().max().item())


@needs_fused_step
@pytest.mark.parametrize("optimize_model", [True, False])
def test_fused_step_matches_the_torch_path(tiny_source, input_ids, optimize_model):
    # optimize_model=False scales the layer outputs instead of the weights: both must carry over.
    # Both paths quantize each linear's input to int8, so a difference of 1e-6 upstream can move
    # a value to the next int8 step: they agree closely, not bit for bit.
    model = load_low_bit_model(tiny_source, "sym_int4", optimize_model=optimize_model)
    assert model.fused_forward is not None, fused_decode.unavailable_reason
    torch_logits, torch_state = decode_steps(model, input_ids, fused=False)
    fused_logits, fused_state = decode_steps(model, input_ids, fused=True)
    result = agreement(torch_logits, fused_logits)
    assert result.top1 >= 0.9 and result.cosine >= 0.999, result
    for fused, reference in zip(fused_state, torch_state):
        assert agreement(reference[0].T, fused[0].T).cosine >= 0.999


@needs_fused_step
def test_fused_decoding_agrees_with_fp32_as_closely_as_the_torch_path(tiny_source, input_ids, fp32_model):
    with torch.inference_mode():
        reference = fp32_model(input_ids).logits[0, 8:]
    model = load_low_bit_model(tiny_source, "sym_int4")
    results = [agreement(reference, decode_steps(model, input_ids, fused)[0])
               for fused in (False, True)]
    torch_path, fused = results
    assert fused.above_floor("sym_int4"), results
    assert fused.top1 >= torch_path.top1 - 0.03 and fused.cosine >= torch_path.cosine - 0.005, results


def test_other_formats_decode_through_the_torch_path(tiny_source):
    assert load_low_bit_model(tiny_source, "sym_int8").fused_forward is None


def test_a_cpu_without_vnni_gets_a_reason(monkeypatch):
    info = cpu_info()
    monkeypatch.setattr(fused_decode, "cpu_info", lambda: type(info)(
        info.vendor, info.model, info.physical_cores, info.sockets, info.flags - {"avx512_vnni"}))
    with pytest.raises(RuntimeError, match="lacks avx512_vnni; decoding uses bigdl-llm's kernels"):
        fused_decode.build_library()


@needs_vnni
def test_a_failing_compiler_gets_a_reason(monkeypatch):
    monkeypatch.setenv("CC", "false")
    with pytest.raises(RuntimeError, match="false failed"):
        fused_decode.build_library(("-DFORCE_A_NEW_BUILD",))


@needs_vnni
def test_kernel_sweep_times_one_tokens_weights(tmp_path):
    result_file = tmp_path / "sweep.json"
    script = REPO_ROOT / "helpers" / "kernel_sweep.py"
    subprocess.run([sys.executable, str(script), "--shape", "1b5", "--threads", "1,2", "--json", str(result_file)],
                   check=True, capture_output=True)
    result = json.loads(result_file.read_text())
    hidden, layers = 2048, 24
    weights = layers * (5 * hidden * hidden + 2 * 4 * hidden * hidden) + 65536 * hidden
    assert result["weight_bytes"] == weights // 64 * 34
    assert [r["threads"] for r in result["records"]] == [1, 2]
    assert all(r["kernel_ms"] > 0 and r["bound_ms"] > 0 for r in result["records"])
