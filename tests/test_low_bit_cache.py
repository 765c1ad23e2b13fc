"""The low-bit cache: converted once, loaded after, rebuilt when damaged or stale, turned off on request."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from helpers.lessons.quality import logits_for
from helpers.runtime import library
from helpers.runtime.loading import load_cached_low_bit_model, load_model, load_tokenizer
from helpers.runtime.low_bit_cache import cache_dir
from helpers.runtime.models import resolve_model


def test_low_bit_cache_round_trip(tiny_source, input_ids, sym_int4_logits, cache_here):
    folder = cache_dir(tiny_source, "sym_int4")
    first = load_cached_low_bit_model(tiny_source, report=cache_here.append)
    assert (folder / "tokenization_rwkv_world.py").exists()
    written = (folder / "config.json").stat().st_mtime
    second = load_cached_low_bit_model(tiny_source, report=cache_here.append)
    assert (folder / "config.json").stat().st_mtime == written  # read, not written again
    assert cache_here[0].startswith("Converted rwkv-4-world-tiny to sym_int4 in ") and "(no cache yet)" in cache_here[0]
    assert cache_here[1].startswith(f"Loaded rwkv-4-world-tiny in sym_int4 from the cache in {folder} in ")
    for model in (first, second):
        assert torch.allclose(logits_for(model, input_ids), sym_int4_logits, atol=1e-4)


STAND_IN = """

class RWKVWorldTokenizer(RWKVWorldTokenizer):  # a stand-in for a tokenizer module that cannot save itself
    def save_pretrained(self, *args, **kwargs):
        raise TypeError("Object of type bytes is not JSON serializable")
"""


def test_the_cache_works_with_a_tokenizer_that_cannot_save_itself(hub_source, tokenizer, cache_here, tmp_path):
    folder = tmp_path / "hub-like"
    shutil.copytree(hub_source.location, folder)
    with open(folder / "tokenization_rwkv_world.py", "a") as module:
        module.write(STAND_IN)
    source = resolve_model(str(folder))
    load_cached_low_bit_model(source, report=cache_here.append)
    cached = resolve_model(str(cache_dir(source, "sym_int4")))
    assert cached.config["bigdl_transformers_low_bit"] == "sym_int4"
    for name in ("tokenization_rwkv_world.py", "rwkv_vocab_v20230424.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (folder / name).read_bytes() == (Path(cached.location) / name).read_bytes(), name
    copied = load_tokenizer(cached)
    with pytest.raises(TypeError):
        copied.save_pretrained(str(tmp_path / "anywhere"))
    assert copied("What is AI?").input_ids == tokenizer("What is AI?").input_ids
    load_cached_low_bit_model(source, report=cache_here.append)
    assert [line.split()[0] for line in cache_here] == ["Converted", "Loaded"]


def truncate(path):
    with open(path, "r+b") as file:
        file.truncate(path.stat().st_size // 2)


def overwrite_start(path):
    with open(path, "r+b") as file:
        file.write(b"\0" * 64)


@pytest.mark.parametrize("damage, reason", [
    (lambda folder: (folder / "low_bit_cache.json").unlink(), "the cache is incomplete"),
    (lambda folder: truncate(folder / "pytorch_model.bin"), "pytorch_model.bin in the cache is missing or truncated"),
    (lambda folder: (folder / "tokenizer_config.json").unlink(), "tokenizer_config.json in the cache is missing"),
    (lambda folder: overwrite_start(folder / "pytorch_model.bin"), "the cache did not load"),
])
@pytest.mark.library_independent
def test_a_damaged_cache_is_rebuilt(hub_source, input_ids, sym_int4_logits, cache_here, damage, reason):
    load_cached_low_bit_model(hub_source, report=cache_here.append)
    damage(cache_dir(hub_source, "sym_int4"))
    model = load_cached_low_bit_model(hub_source, report=cache_here.append)
    assert cache_here[1].startswith("Converted") and f"({reason}" in cache_here[1], cache_here[1]
    assert torch.allclose(logits_for(model, input_ids), sym_int4_logits, atol=1e-4)
    load_cached_low_bit_model(hub_source, report=cache_here.append)
    assert cache_here[2].startswith("Loaded")


@pytest.mark.library_independent
def test_a_changed_checkpoint_is_converted_again(hub_source, cache_here, tmp_path):
    folder = tmp_path / "changing"
    shutil.copytree(hub_source.location, folder)
    source = resolve_model(str(folder))
    load_cached_low_bit_model(source, report=cache_here.append)
    os.utime(folder / "pytorch_model.bin", ns=(0, 0))
    load_cached_low_bit_model(source, report=cache_here.append)
    assert "(the checkpoint changed since the cache was made)" in cache_here[1]


def test_a_cache_the_other_library_made_is_converted_again(hub_source, cache_here):
    load_cached_low_bit_model(hub_source, report=cache_here.append)
    manifest = cache_dir(hub_source, "sym_int4") / "low_bit_cache.json"
    other = next(name for name in library.PACKAGES if name != library.name())
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "library": other}))
    load_cached_low_bit_model(hub_source, report=cache_here.append)
    assert f"(the cache was made by {other}, and {library.name()} is in use)" in cache_here[1]
    assert json.loads(manifest.read_text())["library"] == library.name()


def test_the_cache_can_be_turned_off(tiny_source, cache_here, monkeypatch):
    monkeypatch.setenv("RWKV_LOW_BIT_CACHE", "0")
    monkeypatch.setattr("helpers.runtime.loading._decoding_path_reported", True)
    load_model(tiny_source, report=cache_here.append)
    assert cache_here == [] and not cache_dir(tiny_source, "sym_int4").exists()


def test_a_saved_low_bit_folder_loads_as_a_model(tiny_source, cache_here):
    load_cached_low_bit_model(tiny_source, "sym_int8")
    result = run_cli("helpers.tools.generate", "--repo-id-or-model-path", str(cache_dir(tiny_source, "sym_int8")),
                     "--n-predict", "5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("-------------------- Output --------------------") == 1


def test_memory_guidance_follows_the_loader_that_will_run(hub_source, cache_here):
    from helpers.runtime.low_bit_cache import planned_loader
    from helpers.runtime.memory import estimate_load_bytes, weight_bytes

    assert planned_loader(hub_source) == "tensor_by_tensor"
    load_cached_low_bit_model(hub_source, report=cache_here.append)
    assert planned_loader(hub_source) == "cache"
    config = hub_source.config  # intermediate_size null, as on the hub
    cache, tensor_by_tensor, from_pretrained = (estimate_load_bytes(config, "sym_int4", loader)
                                                for loader in ("cache", "tensor_by_tensor", "from_pretrained"))
    assert cache == weight_bytes(config, "sym_int4") < tensor_by_tensor < from_pretrained
    assert tensor_by_tensor - cache == config["vocab_size"] * config["hidden_size"] * 2  # the largest fp16 tensor
