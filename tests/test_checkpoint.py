import hashlib
import json
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers.measure import checkpoints
from helpers.lessons.formats import head_share
from helpers.runtime.memory import parameter_counts


def digest(folder):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def test_layout_matches_hugging_face_repos(tiny_source):
    folder = Path(tiny_source.location)
    config = tiny_source.config
    assert config["model_type"] == "rwkv" and config["vocab_size"] == 65536
    assert (config["num_hidden_layers"], config["hidden_size"]) == checkpoints.SHAPES["tiny"]
    assert config["intermediate_size"] == 4 * config["hidden_size"] and config["rescale_every"] == 6
    assert config["tie_word_embeddings"] is False
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["auto_map"]["AutoTokenizer"][0] == "tokenization_rwkv_world.RWKVWorldTokenizer"
    for name in ("model.safetensors", "rwkv_vocab_v20230424.txt", "tokenization_rwkv_world.py"):
        assert (folder / name).exists()


def test_build_is_deterministic(tmp_path, tiny_source, hub_source):
    for layout, source in (("safetensors", tiny_source), ("hub", hub_source)):
        built = checkpoints.build_checkpoint("tiny", tmp_path / layout, layout)
        assert digest(built) == digest(Path(source.location))


def test_hub_layout_is_the_hubs(hub_source, tiny_source):
    folder = Path(hub_source.location)
    assert sorted(path.name for path in folder.iterdir()) == [
        "config.json", "pytorch_model.bin", "rwkv_vocab_v20230424.txt", "special_tokens_map.json",
        "tokenization_rwkv_world.py", "tokenizer_config.json"]
    config = json.loads((folder / "config.json").read_text())
    assert config["intermediate_size"] is None
    assert {k: v for k, v in config.items() if k != "intermediate_size"} == {
        k: v for k, v in tiny_source.config.items() if k != "intermediate_size"}
    assert zipfile.is_zipfile(folder / "pytorch_model.bin")  # torch.save's format, not the legacy pickle
    ours = torch.load(folder / "pytorch_model.bin", weights_only=True)
    expected = load_file(Path(tiny_source.location) / "model.safetensors")
    assert ours.keys() == expected.keys() and all(torch.equal(ours[name], expected[name]) for name in expected)


def test_hub_layout_in_shards(tmp_path):
    folder = checkpoints.build_checkpoint("tiny", tmp_path / "sharded", "hub", shard_bytes=8 * 1024**2)
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files[0] == f"pytorch_model-00001-of-{len(files):05d}.bin"
    assert not (folder / "pytorch_model.bin").exists()


@pytest.mark.parametrize("shape", list(checkpoints.SHAPES))
def test_shapes_and_parameter_counts(shape):
    config = checkpoints.make_config(shape)
    shapes = checkpoints.tensor_shapes(config)
    linear, other = parameter_counts(config)
    assert sum(torch.Size(s).numel() for _, s in shapes) == linear + other
    for shard in checkpoints.plan_shards(shapes):
        assert sum(2 * torch.Size(s).numel() for _, s in shard) <= checkpoints.SHARD_BYTES


def test_weight_names_match_transformers(fp32_model, tiny_source):
    expected = dict(checkpoints.tensor_shapes(tiny_source.config))
    actual = {name: tuple(p.shape) for name, p in fp32_model.state_dict().items()}
    assert actual == expected


def test_head_share_counts_the_models_linears(fp32_model, tiny_source):
    # notebook 12's last memory row, against the linears transformers' model holds
    linears = [module.weight.numel() for module in fp32_model.modules() if isinstance(module, torch.nn.Linear)]
    assert head_share(tiny_source.config) == pytest.approx(fp32_model.head.weight.numel() / sum(linears))


def test_sharded_checkpoint_loads(tmp_path, monkeypatch, tiny_source):
    # Big shapes are written in shards, one layer at a time; check the index works on the tiny shape. (The
    # reference is the one-file checkpoint as written: a model that has run rescales its layers in place.)
    monkeypatch.setattr(checkpoints, "SHARD_BYTES", 8 * 1024**2)
    folder = checkpoints.build_checkpoint("tiny", tmp_path / "sharded")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    one_file = load_file(Path(tiny_source.location) / "model.safetensors")
    assert model.state_dict().keys() == one_file.keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, one_file[name].float()), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_finite_and_peaked(tiny_source, tokenizer, dtype):
    model = AutoModelForCausalLM.from_pretrained(tiny_source.location, torch_dtype=dtype)
    ids = tokenizer("Question: What is AI?\n\nAnswer:", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits.float()
    assert torch.isfinite(logits).all()
    # Peaked like a trained model's distribution, not flat over 65536 tokens.
    assert logits.softmax(-1).max(-1).values.mean() > 0.05
