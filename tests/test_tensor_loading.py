import json
import mmap
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.runtime import library
from helpers.runtime.models import resolve_model
from helpers.runtime.errors import UserError
from helpers.runtime.formats import LOW_BIT_FORMATS
from helpers.runtime.loading import ensure_cache, load_cached_low_bit_model, load_low_bit_model
from helpers.runtime.tensor_loading import HUGE_PAGE, _madvise, huge_page_buffer, settle_on_huge_pages


def parameters(model):
    return {name: parameter.data for name, parameter in model.named_parameters()}


def assert_same_parameters(ours, bigdl):
    assert ours.keys() == bigdl.keys()
    for name in bigdl:
        assert ours[name].dtype == bigdl[name].dtype and torch.equal(ours[name], bigdl[name]), name


@pytest.mark.parametrize("low_bit, optimize_model",
                         [(f, True) for f in LOW_BIT_FORMATS] + [("sym_int4", False), ("sym_int4_head8", True)])
def test_tensor_by_tensor_gives_bigdls_weights(tiny_source, low_bit, optimize_model):
    ours = load_low_bit_model(tiny_source, low_bit, optimize_model)
    bigdl = load_low_bit_model(tiny_source, low_bit, optimize_model, loader="from_pretrained")
    assert ours.rwkv.layers_are_rescaled == bigdl.rwkv.layers_are_rescaled
    assert_same_parameters(parameters(ours), parameters(bigdl))


@pytest.mark.parametrize("low_bit", LOW_BIT_FORMATS)
def test_a_bin_checkpoint_gives_the_same_weights(tiny_source, hub_source, low_bit):
    from_bin = load_low_bit_model(hub_source, low_bit)
    assert_same_parameters(parameters(from_bin), parameters(load_low_bit_model(tiny_source, low_bit)))


def bin_copy(hub_source, folder, dtype=torch.float16, shard_bytes=None):
    """The hub-layout checkpoint re-saved in `dtype`, in one pytorch_model.bin or in shards."""
    shutil.copytree(hub_source.location, folder)
    (folder / "pytorch_model.bin").unlink()
    tensors = {name: tensor.to(dtype) for name, tensor in torch.load(Path(hub_source.location) / "pytorch_model.bin").items()}
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": str(dtype).removeprefix("torch.")}))
    if shard_bytes is None:
        torch.save(tensors, folder / "pytorch_model.bin")
    else:
        from transformers.modeling_utils import shard_checkpoint

        shards, index = shard_checkpoint(tensors, max_shard_size=shard_bytes, weights_name="pytorch_model.bin")
        for file_name, shard in shards.items():
            torch.save(shard, folder / file_name)
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return resolve_model(str(folder))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bf16_and_fp32_bin_checkpoints_give_bigdls_weights(hub_source, tmp_path, dtype):
    source = bin_copy(hub_source, tmp_path / "copy", dtype)
    ours = load_low_bit_model(source, "sym_int4")
    bigdl = load_low_bit_model(source, "sym_int4", loader="from_pretrained")
    assert_same_parameters(parameters(ours), parameters(bigdl))


def test_a_sharded_bin_checkpoint_gives_the_same_weights(hub_source, tmp_path):
    source = bin_copy(hub_source, tmp_path / "sharded", shard_bytes=8 * 1024**2)
    assert len(list((tmp_path / "sharded").glob("pytorch_model-*.bin"))) > 3
    assert_same_parameters(parameters(load_low_bit_model(source)), parameters(load_low_bit_model(hub_source)))


def test_a_bin_holding_anything_but_tensors_is_refused_unread(hub_source, tmp_path):
    folder = tmp_path / "strange"
    shutil.copytree(hub_source.location, folder)
    torch.save({"rwkv.embeddings.weight": torch.zeros(2, 2, dtype=torch.int32), "note": ValueError("x")},
               folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="cannot be read as a checkpoint .it holds .*re-save it with save_pretrained"):
        load_low_bit_model(resolve_model(str(folder)))


def test_a_truncated_bin_checkpoint_is_reported(hub_source, tmp_path):
    folder = tmp_path / "truncated"
    shutil.copytree(hub_source.location, folder)
    with open(folder / "pytorch_model.bin", "r+b") as file:
        file.truncate((folder / "pytorch_model.bin").stat().st_size // 2)
    with pytest.raises(UserError, match="pytorch_model.bin cannot be read as a checkpoint .* download it again"):
        load_low_bit_model(resolve_model(str(folder)))


def test_the_mapped_cache_gives_bigdls_load_low_bit_weights(tiny_source, tmp_path, monkeypatch):
    monkeypatch.setattr("helpers.runtime.low_bit_cache.CACHE_DIR", tmp_path)
    mapped = load_cached_low_bit_model(tiny_source)
    bigdl = load_cached_low_bit_model(tiny_source, loader="load_low_bit")
    assert_same_parameters(parameters(mapped), parameters(bigdl))
    assert mapped.rwkv.embeddings.weight.dtype == torch.float16


def test_a_mix_keeps_its_head_in_sym_int8_through_the_cache(tiny_source, tmp_path, monkeypatch):
    from helpers.runtime.memory import model_weight_bytes, weight_bytes

    ggml_tensor_qtype = library.low_bit_linear().ggml_tensor_qtype

    monkeypatch.setattr("helpers.runtime.low_bit_cache.CACHE_DIR", tmp_path)
    converted = load_low_bit_model(tiny_source, "sym_int4_head8")
    cached = load_cached_low_bit_model(tiny_source, "sym_int4_head8")
    assert_same_parameters(parameters(cached), parameters(converted))
    assert cached.head.qtype == ggml_tensor_qtype["sym_int8"]
    assert {m.qtype for m in cached.rwkv.modules() if hasattr(m, "qtype")} == {ggml_tensor_qtype["sym_int4"]}
    assert model_weight_bytes(cached) == pytest.approx(weight_bytes(tiny_source.config, "sym_int4_head8"), rel=0.01)
    with pytest.raises(UserError, match="load_low_bit reads models in one format, and sym_int4_head8 mixes two"):
        load_cached_low_bit_model(tiny_source, "sym_int4_head8", loader="load_low_bit")


def _transparent_huge_pages():
    try:
        return "[never]" not in open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return False


def _anon_huge_kib(address):
    """AnonHugePages of the mapping of this process that holds `address`."""
    inside = False
    for line in open("/proc/self/smaps"):
        first = line.split()[0]
        if "-" in first and ":" not in first:
            start, end = (int(part, 16) for part in first.split("-"))
            inside = start <= address < end
        elif inside and first == "AnonHugePages:":
            return int(line.split()[1])
    return 0


@pytest.mark.parametrize("loader", ["converted", "cache"])
def test_low_bit_weights_share_one_aligned_buffer(tiny_source, tmp_path, monkeypatch, loader):
    """Converted, or copied out of the cache's mapped file (its 4 KiB pages decode more slowly)."""
    LowBitLinear = library.low_bit_linear().LowBitLinear
    monkeypatch.setattr("helpers.runtime.low_bit_cache.CACHE_DIR", tmp_path)
    if loader == "cache":
        ensure_cache(tiny_source)
    model = load_low_bit_model(tiny_source) if loader == "converted" else load_cached_low_bit_model(tiny_source)
    weights = sorted((m.weight.data for m in model.modules() if isinstance(m, LowBitLinear)), key=torch.Tensor.data_ptr)
    assert len({w.untyped_storage().data_ptr() for w in weights}) == 1
    assert all(w.data_ptr() % 64 == 0 for w in weights)
    assert all(a.data_ptr() + a.nbytes <= b.data_ptr() for a, b in zip(weights, weights[1:]))  # no overlap
    if _transparent_huge_pages():
        assert _anon_huge_kib(weights[0].data_ptr()) >= 2048


@pytest.mark.skipif(not _transparent_huge_pages() or tuple(map(int, os.uname().release.split(".")[:2])) < (6, 1),
                    reason="needs transparent huge pages and Linux 6.1 or newer (MADV_COLLAPSE)")
def test_weights_written_on_small_pages_are_moved_onto_huge_pages():
    buffer = huge_page_buffer(4 * HUGE_PAGE)
    region = (buffer.data_ptr(), buffer.numel())
    _madvise(*region, mmap.MADV_NOHUGEPAGE)
    buffer.fill_(1)  # written on 4 KiB pages, as under memory pressure
    assert _anon_huge_kib(buffer.data_ptr()) == 0  # a mapping of its own while its flags differ
    _madvise(*region, mmap.MADV_HUGEPAGE)
    before = _anon_huge_kib(buffer.data_ptr())  # of the mapping it may have merged back into
    settle_on_huge_pages({"weight": buffer[:100]})
    assert _anon_huge_kib(buffer.data_ptr()) - before == 4 * HUGE_PAGE // 1024
    assert bool((buffer == 1).all())


@pytest.fixture
def broken_copy(tiny_source, tmp_path):
    """A copy of the tiny checkpoint, and its weights file to break."""
    folder = tmp_path / "copy"
    shutil.copytree(tiny_source.location, folder)
    return folder, folder / "model.safetensors"


def test_a_truncated_checkpoint_is_reported(broken_copy):
    folder, weights = broken_copy
    with open(weights, "r+b") as file:
        file.truncate(weights.stat().st_size - 1000)
    with pytest.raises(UserError, match="truncated"):
        load_low_bit_model(resolve_model(str(folder)))


def test_a_missing_tensor_is_reported(broken_copy):
    folder, weights = broken_copy
    tensors = load_file(weights)
    del tensors["head.weight"]
    save_file(tensors, weights)
    with pytest.raises(UserError, match="lacks 1 tensors .first: head.weight"):
        load_low_bit_model(resolve_model(str(folder)))


def test_a_tensor_of_another_model_is_reported(broken_copy):
    folder, weights = broken_copy
    tensors = load_file(weights)
    tensors["transformer.wte.weight"] = torch.zeros(4, 4, dtype=torch.float16)
    save_file(tensors, weights)
    with pytest.raises(UserError, match="no place for"):
        load_low_bit_model(resolve_model(str(folder)))


def test_an_unknown_loader_is_refused(tiny_source):
    with pytest.raises(UserError, match="Unknown loader"):
        load_low_bit_model(tiny_source, loader="fast")
