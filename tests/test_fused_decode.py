"""The native decoding step (helpers/runtime/rwkv4_decode.c) computes what the torch path computes."""
import contextlib
import ctypes
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import zipfile

import pytest
import torch

from helpers.measure import provenance, reports
from helpers.lessons.quality import agreement, stepwise_logits
from helpers.measure.timing import seconds
from helpers.runtime import fused_decode, library
from helpers.runtime.cpu import cpu_info
from helpers.runtime.loading import load_low_bit_model
from helpers.runtime.paths import REPO_ROOT
from helpers.runtime.settings import read as read_settings
from helpers.tools import kernel_sweep

needs_fused_step = pytest.mark.skipif(fused_decode.library() is None, reason=str(fused_decode.unavailable_reason))
RUNNABLE = fused_decode.runnable_kernels()
every_build = pytest.mark.parametrize("kernel", [
    pytest.param(name, marks=pytest.mark.skipif(name not in RUNNABLE, reason=f"this CPU cannot run the {name} build"))
    for name in fused_decode.KERNELS])


def formats_of(model):
    """The kernel's numbers of the formats of a model's layers and head, as its fused step reads them."""
    return model.fused_forward.model.format, model.fused_forward.model.head_format


def decode_steps(model, input_ids, fused):
    """(logits, state) of reading input_ids token by token after an 8-token prompt, fused or not."""
    with contextlib.nullcontext() if fused else fused_decode.torch_path(model):
        run = stepwise_logits(model, input_ids)
    return run.logits, run.state


@every_build
@pytest.mark.parametrize("low_bit", fused_decode.FORMATS)
def test_kernel_matches_the_librarys_matmul(kernel, low_bit):
    """The kernel reads the library's blocks as the library's own matmul does (bigdl-llm's or ipex-llm's)."""
    low_bit_linear = library.low_bit_linear()
    ggml_convert_qtype, ggml_tensor_qtype = low_bit_linear.ggml_convert_qtype, low_bit_linear.ggml_tensor_qtype
    ggml_matmul_src1_x_src0_t = low_bit_linear.ggml_matmul_src1_x_src0_t
    native = fused_decode.load_library(kernel)
    assert fused_decode.kernel_name(native) == kernel
    qtype, format_index = ggml_tensor_qtype[low_bit], fused_decode.FORMATS.index(low_bit)
    generator = torch.Generator().manual_seed(0)
    for rows, cols, tokens in ((256, 256, 1), (1024, 4096, 1), (512, 1024, 3), (256, 1024, 5), (512, 256, 20)):
        weight = ggml_convert_qtype(torch.randn(rows, cols, generator=generator), qtype)
        x = torch.randn(tokens, cols, generator=generator)
        expected = ggml_matmul_src1_x_src0_t(weight, x, torch.Size([rows, cols]), qtype)
        for threads in (1, 2):
            y = torch.empty(max(tokens, (tokens + 7) // 8 * 8), rows)  # room for the kernel's padding tokens
            assert native.rwkv4_matmul(weight.data_ptr(), format_index, rows, cols, x.data_ptr(), tokens, y.data_ptr(),
                                       threads) == 0
            assert torch.allclose(y[:tokens], expected, rtol=1e-4, atol=2e-3 * expected.abs().max().item()), low_bit


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


@every_build
@pytest.mark.parametrize("low_bit", fused_decode.FORMATS)
def test_every_build_computes_the_same_logits(tiny_source, input_ids, fp32_model, kernel, low_bit):
    # The builds differ only in exact integer dot products: a prompt, a decoding step and a batched
    # step give bit-identical logits, so a test on one CPU holds for the others. Each build is also held
    # to an independent reference, FP32 through transformers: on a CPU whose only build is avx2, the
    # comparison between builds compares avx2 with itself.
    with torch.inference_mode():
        reference = fp32_model(input_ids).logits[0, 8:]
    model = load_low_bit_model(tiny_source, low_bit)
    assert model.fused_forward is not None, fused_decode.unavailable_reason
    results, build = [], fused_decode.load_library(kernel)
    for native in (build, fused_decode.load_library("avx2")):
        fused = fused_decode.FusedForward(model, native, *formats_of(model))
        prompt_logits, state = fused(input_ids[:, :20])
        step_logits, _ = fused(input_ids[:, 20:21], [s.clone() for s in state])
        batch = fused.run(input_ids[0, 20:29].unsqueeze(1), [[s[0].clone() for s in state] for _ in range(9)])
        results.append((prompt_logits, step_logits, batch))
    for mine, plain_avx2 in zip(*results):
        assert torch.equal(mine, plain_avx2)
    whole_prompt, _ = fused_decode.FusedForward(model, build, *formats_of(model))(input_ids)
    assert agreement(reference, whole_prompt[0, 8:]).above_floor(low_bit)


@needs_fused_step
@pytest.mark.parametrize("low_bit", fused_decode.FORMATS)
def test_fused_decoding_agrees_with_fp32_as_closely_as_the_torch_path(tiny_source, input_ids, fp32_model, low_bit):
    with torch.inference_mode():
        reference = fp32_model(input_ids).logits[0, 8:]
    model = load_low_bit_model(tiny_source, low_bit)
    assert model.fused_forward is not None
    results = [agreement(reference, decode_steps(model, input_ids, fused)[0])
               for fused in (False, True)]
    torch_path, fused = results
    assert fused.above_floor(low_bit), results
    assert fused.top1 >= torch_path.top1 - 0.03 and fused.cosine >= torch_path.cosine - 0.005, results


@needs_fused_step
def test_a_mix_runs_the_fused_step_with_the_heads_own_format(tiny_source, input_ids):
    model = load_low_bit_model(tiny_source, "sym_int4_head8")
    body, head = formats_of(model)
    assert (fused_decode.FORMATS[body], fused_decode.FORMATS[head]) == ("sym_int4", "sym_int8")
    torch_logits, _ = decode_steps(model, input_ids, fused=False)
    result = agreement(torch_logits, decode_steps(model, input_ids, fused=True)[0])
    assert result.top1 >= 0.9 and result.cosine >= 0.999, result
    model.fused_forward.model.head_format = body  # a kernel that reads the head's 8-bit blocks as 4-bit ones
    with torch.inference_mode():
        planted = agreement(torch_logits, decode_steps(model, input_ids, fused=True)[0])
    assert not planted.cosine >= 0.9, planted


def test_a_linear_in_a_format_the_kernel_cannot_read_keeps_the_model_on_the_torch_path(tiny_source):
    model = load_low_bit_model(tiny_source, "sym_int4")
    model.head.qtype = library.low_bit_linear().ggml_tensor_qtype["asym_int5"]
    assert fused_decode.FusedForward.for_model(model) is None


def cpu_with(flags):
    info = cpu_info()
    return type(info)(info.vendor, info.model, info.physical_cores, info.sockets, frozenset(flags))


LAPTOP = {"avx", "avx2", "fma", "f16c"}  # an Intel Core before the 12th generation, or an AMD Zen 1-3


@pytest.mark.library_independent
def test_each_cpu_gets_the_fastest_build_it_runs():
    assert fused_decode.kernel_choice(info=cpu_with(LAPTOP | {"avx_vnni"}))[0] == "avxvnni"
    assert fused_decode.kernel_choice(info=cpu_with(LAPTOP | {"avx_vnni", "avx512f", "avx512vl", "avx512_vnni"}))[0] == "avx512"
    kernel, flags = fused_decode.kernel_choice(info=cpu_with(LAPTOP))
    assert kernel == "avx2" and "-DKERNEL_AVX2" in flags and not any("512" in f or "vnni" in f for f in flags)
    with pytest.raises(RuntimeError, match="RWKV_FUSED_KERNEL=avx512 needs avx512f, avx512vl, avx512_vnni, which "
                                           "this CPU lacks; it runs avx2"):
        fused_decode.kernel_choice("avx512", info=cpu_with(LAPTOP))
    with pytest.raises(RuntimeError, match="RWKV_FUSED_KERNEL=sse is not a build; choose auto or one of"):
        fused_decode.kernel_choice("sse", info=cpu_with(LAPTOP))
    with pytest.raises(RuntimeError, match="lacks avx2, f16c; decoding uses the low-bit library's kernels"):
        fused_decode.kernel_choice(info=cpu_with({"avx", "fma"}))


@pytest.mark.library_independent
def test_a_failing_compiler_gets_a_reason(monkeypatch):
    monkeypatch.setenv("CC", "false")
    with pytest.raises(RuntimeError, match="false failed"):
        fused_decode.build_library("avx2", ("-DFORCE_A_NEW_BUILD",))


@pytest.mark.library_independent
def test_kernel_sweep_times_one_tokens_weights_from_memory_and_in_cache(tmp_path):
    result_file = tmp_path / "sweep.json"
    subprocess.run([sys.executable, "-m", "helpers.tools.kernel_sweep", "--shape", "1b5", "--threads", "1,2",
                    "--tokens", "1,9", "--rounds", "2", "--json", str(result_file)], check=True, capture_output=True,
                   cwd=REPO_ROOT)  # 9 tokens: the kernel pads them to 16
    result = json.loads(result_file.read_text())
    hidden, layers = 2048, 24
    weights = layers * (5 * hidden * hidden + 2 * 4 * hidden * hidden) + 65536 * hidden
    assert result["weight_bytes"] == weights // 64 * 34
    assert [(r["threads"], r["tokens"]) for r in result["records"]] == [(1, 1), (1, 9), (2, 1), (2, 9)]
    for record in result["records"]:
        # the multiply-add bound is one token's: a batch's products are summed another way
        figures = ["kernel_ms", "in_cache_ms", "bound_ms"] + ["multiply_add_bound_ms"] * (record["tokens"] == 1)
        assert sorted(key for key in record if key.endswith("_ms")) == sorted(figures)
        assert all(len(record[f"{key}_rounds"]) == 2 and min(record[f"{key}_rounds"]) > 0 and
                   record[key] == statistics.median(record[f"{key}_rounds"]) for key in figures)
    one = result["records"][0]
    memory, read, multiply_adds = one["kernel_ms_rounds"], one["bound_ms_rounds"], one["multiply_add_bound_ms_rounds"]
    assert reports.kernel_round_ratios(one)["over_bound"] == [memory[i] / max(read[i], multiply_adds[i]) for i in (0, 1)]
    assert result["provenance"]["fingerprint"] == provenance.fingerprint("kernel")
    assert provenance.is_current(result["provenance"]) and result["provenance"]["threads"] == 2
    assert provenance.caption(result["provenance"]).startswith("Measured ")


@pytest.mark.library_independent
@pytest.mark.parametrize("flag, told", [(["--tokens", "0"], "numbers of 1 or more"), (["--threads", "two"], "numbers of 1"),
                                        (["--rounds", "0"], "numbers of 1"), (["--rounds", "3,5"], "give one number")])
def test_kernel_sweep_refuses_what_is_not_a_count(flag, told, capsys):
    with pytest.raises(SystemExit) as stopped:
        kernel_sweep.main(["--shape", "1b5", *flag])
    assert stopped.value.code == 2 and told in capsys.readouterr().err


@pytest.mark.library_independent
@pytest.mark.parametrize("budget", [1 << 20, 8 << 20, 1 << 30])
def test_the_in_cache_slices_cover_every_row_once_within_the_budget(budget):
    matrices = [(torch.empty(rows * cols // 64 * 34, dtype=torch.uint8), rows, cols)
                for rows, cols in [(2048, 2048), (8192, 2048), (2048, 8192), (65536, 2048), (64, 65536)]]
    slices = iter(kernel_sweep.row_slices(matrices, budget))
    for weights, rows, cols in matrices:  # in order, each matrix's rows from the first, in whole groups
        row_bytes, covered = weights.numel() // rows, 0
        while covered < rows:
            address, slice_rows, slice_cols = next(slices)
            assert (address, slice_cols) == (weights.data_ptr() + covered * row_bytes, cols)
            assert slice_rows % 64 == 0 and (slice_rows * row_bytes <= budget or slice_rows == 64)
            covered += slice_rows
        assert covered == rows
    assert next(slices, None) is None


@pytest.mark.library_independent
@pytest.mark.parametrize("kernel", list(fused_decode.runnable_kernels()))
@pytest.mark.parametrize("low_bit", ["sym_int4", "sym_int8"])
def test_the_multiply_add_rate_is_one_no_product_of_the_kernel_beats(kernel, low_bit):
    # The kernel's own product of one token, on a matrix that stays in cache, computes each block's
    # multiply-adds and more: it cannot get through more blocks a second than the multiply-adds alone.
    native, index = fused_decode.load_library(kernel), fused_decode.FORMATS.index(low_bit)
    rows, cols = 64, 2048
    blocks = rows * cols // fused_decode.BLOCK
    weights = torch.randint(0, 256, (blocks * fused_decode.BLOCK_BYTES[index],), dtype=torch.uint8)
    scale = torch.tensor([0.01], dtype=torch.float32 if low_bit == "sym_int8" else torch.float16).view(torch.uint8)
    weights.view(blocks, -1)[:, :scale.numel()] = scale  # finite scales: sym_int8's are fp32, the others' fp16
    x, y = torch.randn(cols), torch.empty(rows)
    product = lambda: native.rwkv4_matmul(weights.data_ptr(), index, rows, cols, x.data_ptr(), 1, y.data_ptr(), 1)  # noqa: E731
    product()
    kernel_rate = blocks * 200 / seconds(lambda: [product() for _ in range(200)])
    rate = native.rwkv4_block_dots_per_second(index, 1)
    assert kernel_rate < rate < 100 * kernel_rate


@pytest.mark.library_independent
@pytest.mark.parametrize("kernel", ["avxvnni", "avx2"])
def test_a_laptops_build_holds_only_its_own_instructions(tmp_path, kernel):
    # Compiled here as on a laptop (not run, where this CPU lacks them): no AVX-512 register or
    # instruction, and the dot products in the build's own instructions.
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    library = tmp_path / f"{kernel}.so"
    compiler = read_settings().compiler or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler (install gcc) to build the laptop's kernel with")
    subprocess.run([compiler, *fused_decode.FLAGS, *fused_decode.KERNELS[kernel][1],
                    f"-DKERNEL_{kernel.upper()}", str(fused_decode.SOURCE), "-o", str(library), "-lm"], check=True)
    code = subprocess.run([objdump, "-d", str(library)], capture_output=True, text=True, check=True).stdout
    assert not re.search(r"%zmm|%ymm(1[6-9]|2\d|3[01])\b|%k[1-7]\b|\{evex\}", code)
    if kernel == "avxvnni":
        assert "{vex} vpdpbusd" in code
    else:
        assert "vpdpbusd" not in code and "vpmaddubsw" in code


@needs_fused_step
def test_states_the_kernel_cannot_read_get_one_line_before_any_native_call(tiny_source, input_ids):
    model = load_low_bit_model(tiny_source, "sym_int4")
    fused = model.fused_forward
    _, state = fused(input_ids[:, :8])
    one = [s[0] for s in state]
    ids = input_ids[0, 8:10].unsqueeze(1)  # two sequences of one token
    wider = [torch.zeros(1, 2 * s.shape[1], s.shape[2]) for s in state]  # a state of a model of another size
    for states, expected in (([one], "one state per sequence: 2 sequence(s), 1 state(s)"),
                             ([one, one[:4]], "state 1 must be five contiguous float32 tensors"),
                             ([one, wider], "state 1 must be five"), ([one, [s.double() for s in one]], "state 1"),
                             ([one, [s.T for s in one]], "state 1")):
        with pytest.raises(ValueError, match=re.escape(expected)) as raised:
            fused.run(ids, states)
        assert "\n" not in str(raised.value)
    with pytest.raises(ValueError, match="token ids shaped"):
        fused.run(input_ids[0, :3], [one])
    assert torch.equal(fused.run(ids, [[s.clone() for s in one] for _ in range(2)])[0], fused.run(ids[:1], [one])[0])


@needs_fused_step
def test_weights_the_kernel_cannot_read_are_refused_when_it_is_built(tiny_source):
    model = load_low_bit_model(tiny_source, "sym_int4")
    fused = model.fused_forward
    with pytest.raises(ValueError, match="reads layer 0's attention_key as .* torch.uint8 values; the model has"):
        sym_int8 = fused_decode.FORMATS.index("sym_int8")
        fused_decode.FusedForward(model, fused.native, sym_int8, sym_int8)  # sizes of another format
    model.rwkv.blocks[3].ln2.weight.data = model.rwkv.blocks[3].ln2.weight.data.half()
    expected = "layer 3's ln2_weight as 256 contiguous torch.float32 values; the model has 256 contiguous torch.float16"
    with pytest.raises(ValueError, match=expected):
        fused_decode.FusedForward(model, fused.native, *formats_of(model))


@pytest.mark.library_independent
@needs_fused_step
def test_a_failed_allocation_in_the_kernel_is_a_memory_error(tiny_source):
    # Under an address-space limit just above what the process holds, the kernel's buffers for a long prompt
    # (about 13 kB a token here) cannot be allocated: it must return an error, not write through NULL.
    code = f"""
import resource, torch
from helpers.runtime.models import resolve_model
from helpers.runtime.loading import load_low_bit_model
model = load_low_bit_model(resolve_model({tiny_source.location!r}), "sym_int4")
fused = model.fused_forward
fused(torch.tensor([[1, 2, 3]]))  # the OpenMP threads exist before the limit
used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
ids = torch.ones(1, 50_000, dtype=torch.int64)
resource.setrlimit(resource.RLIMIT_AS, (used + 2**28, resource.RLIM_INFINITY))
try:
    fused.run(ids, [fused.new_state()])
except MemoryError as error:
    print("MemoryError:", error)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "MemoryError: the fused step could not allocate its buffers for 1 sequence(s) of 50000 token(s)" in result.stdout


def built_from(source_text, tmp_path, monkeypatch):
    """A library compiled (quickly, -O0) from source_text instead of rwkv4_decode.c, and its path."""
    tmp_path.mkdir(exist_ok=True)
    source = tmp_path / "rwkv4_decode.c"
    source.write_text(source_text)
    with monkeypatch.context() as patch:
        patch.setattr(fused_decode, "SOURCE", source)
        patch.setenv("RWKV_KERNEL_CACHE", str(tmp_path / "kernels"))
        path = fused_decode.build_library("avx2", ["-O0"])
    return ctypes.CDLL(str(path)), path


def refusal(native, path):
    with pytest.raises(RuntimeError) as raised:
        fused_decode.check_abi(native, path)
    assert "\n" not in str(raised.value) and str(raised.value).endswith("rebuild it with `make install`")
    return str(raised.value)


@pytest.mark.library_independent
@pytest.mark.skipif("avx2" not in RUNNABLE, reason="this CPU cannot run the avx2 build")
def test_a_library_with_fields_or_formats_in_another_order_is_refused_with_one_line(tmp_path, monkeypatch):
    source = fused_decode.SOURCE.read_text()
    fused_decode.check_abi(*built_from(source, tmp_path / "same", monkeypatch))  # the same source passes
    swapped_fields = source.replace("*attention_key, *attention_value,", "*attention_value, *attention_key,")
    swapped_formats = source.replace("enum { SYM_INT4, ASYM_INT4,", "enum { ASYM_INT4, SYM_INT4,")
    assert swapped_fields != source and swapped_formats != source
    assert "Layer: attention_key@56 where the library has attention_key@64" in refusal(
        *built_from(swapped_fields, tmp_path / "fields", monkeypatch))
    assert "formats: sym_int4=34 where the library has asym_int4=36" in refusal(
        *built_from(swapped_formats, tmp_path / "formats", monkeypatch))
    native, path = built_from(source, tmp_path / "same", monkeypatch)
    with monkeypatch.context() as patch:  # the Python side's list in another order
        patch.setattr(fused_decode, "FORMATS", ("asym_int4", "sym_int4", "sym_int5", "sym_int8"))
        assert "formats: asym_int4=34 where the library has sym_int4=34" in refusal(native, path)
    older = source.replace("int rwkv4_interface(", "int rwkv4_interface_renamed(")
    native, path = built_from(older, tmp_path / "older", monkeypatch)
    assert "built from older source, which does not describe its interface" in refusal(native, path)


@pytest.mark.library_independent
@needs_fused_step
def test_builds_are_kept_outside_the_project_and_install_builds_every_runnable_one(tmp_path):
    assert REPO_ROOT not in fused_decode.build_library().parents
    cache = tmp_path / "kernels"
    result = subprocess.run([sys.executable, "-m", "helpers.tools.build_kernels"], capture_output=True,
                            text=True, cwd=REPO_ROOT, env={**os.environ, "RWKV_KERNEL_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr
    built = sorted(cache.glob("rwkv4_decode-*.so"))
    assert len(built) == len(RUNNABLE) and all(f"{kernel} build: {cache}" in result.stdout for kernel in RUNNABLE)
    assert f"Decoding will use helpers' fused step, its {next(iter(RUNNABLE))} build" in result.stdout


@pytest.mark.library_independent
def test_without_a_compiler_the_first_load_says_why(tmp_path):
    script = "from helpers.runtime import fused_decode; print(fused_decode.decoding_path())"
    env = {**os.environ, "CC": "", "RWKV_KERNEL_CACHE": str(tmp_path / "empty"), "PATH": str(tmp_path)}  # no cc, gcc
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT, env=env)
    assert result.stdout.strip() == (f"{library.name()}'s kernels through torch (slower than the fused step): no C compiler "
                                     "found (install gcc, e.g. `apt install gcc`, then `make install`)"), result.stderr


@pytest.mark.library_independent
def test_the_kernel_source_ships_in_the_package(tmp_path):
    project = tmp_path / "project"  # a copy: building writes build/ beside pyproject.toml
    shutil.copytree(REPO_ROOT / "helpers", project / "helpers", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "pyproject.toml", project)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(project)], check=True, capture_output=True)
    with zipfile.ZipFile(next(tmp_path.glob("*.whl"))) as wheel:
        assert "helpers/runtime/rwkv4_decode.c" in wheel.namelist()
