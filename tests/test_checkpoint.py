import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import checkpoint
from helpers.memory import parameter_counts


def digest(folder):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def test_layout_matches_hugging_face_repos(tiny_source):
    folder = Path(tiny_source.location)
    config = tiny_source.config
    assert config["model_type"] == "rwkv" and config["vocab_size"] == 65536
    assert (config["num_hidden_layers"], config["hidden_size"]) == checkpoint.SHAPES["tiny"]
    assert config["intermediate_size"] == 4 * config["hidden_size"] and config["rescale_every"] == 6
    assert config["tie_word_embeddings"] is False
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["auto_map"]["AutoTokenizer"][0] == "tokenization_rwkv_world.RWKVWorldTokenizer"
    for name in ("model.safetensors", "rwkv_vocab_v20230424.txt", "tokenization_rwkv_world.py"):
        assert (folder / name).exists()


def test_build_is_deterministic(tmp_path, tiny_source):
    built = checkpoint.build_checkpoint("tiny", tmp_path / "again")
    assert digest(built) == digest(Path(tiny_source.location))


@pytest.mark.parametrize("shape", list(checkpoint.SHAPES))
def test_shapes_and_parameter_counts(shape):
    config = checkpoint.make_config(shape)
    shapes = checkpoint.tensor_shapes(config)
    linear, other = parameter_counts(config)
    assert sum(torch.Size(s).numel() for _, s in shapes) == linear + other
    for shard in checkpoint.plan_shards(shapes):
        assert sum(2 * torch.Size(s).numel() for _, s in shard) <= checkpoint.SHARD_BYTES


def test_weight_names_match_transformers(fp32_model, tiny_source):
    expected = dict(checkpoint.tensor_shapes(tiny_source.config))
    actual = {name: tuple(p.shape) for name, p in fp32_model.state_dict().items()}
    assert actual == expected


def test_sharded_checkpoint_loads(tmp_path, monkeypatch, fp32_model):
    # Big shapes are written in shards, one layer at a time; check the index works on the tiny shape.
    monkeypatch.setattr(checkpoint, "SHARD_BYTES", 8 * 1024**2)
    folder = checkpoint.build_checkpoint("tiny", tmp_path / "sharded")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, fp32_model.state_dict()[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_finite_and_peaked(tiny_source, tokenizer, dtype):
    model = AutoModelForCausalLM.from_pretrained(tiny_source.location, torch_dtype=dtype)
    ids = tokenizer("Question: What is AI?\n\nAnswer:", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits.float()
    assert torch.isfinite(logits).all()
    # Peaked like a trained model's distribution, not flat over 65536 tokens.
    assert logits.softmax(-1).max(-1).values.mean() > 0.05
