"""The offline RWKV-4 World checkpoints: random weights, real architecture, real tokenizer, and the model
trained here, built from its committed compact weights. `python -m helpers.tools.checkpoint` builds them;
the tools, the tests and the lessons find (or build) them here.

Two layouts, the same weights:
- ``safetensors`` (the default): config.json, fp16 safetensors (in 2 GiB shards above that), the
  tokenizer files;
- ``hub``: exactly as the Hugging Face repos ``RWKV/rwkv-4-world-*`` ship it: config.json with
  ``"intermediate_size": null``, one fp16 ``pytorch_model.bin`` in torch's zip format (in shards with
  ``pytorch_model.bin.index.json`` when --shard-gb is given), the tokenizer module, vocabulary,
  tokenizer_config.json and special_tokens_map.json.
A random checkpoint's text is meaningless.
"""
import hashlib
import json
import math
import shutil
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from helpers.runtime import tokenization_rwkv_world
from helpers.runtime.paths import DATA_DIR, MODELS_DIR, TRAINED_MODEL_DIR
from helpers.runtime.shapes import CONTEXT_LENGTH, SHAPES, VOCAB_SIZE

SHARD_BYTES = 2 * 1024**3  # of the safetensors layout
SEED = 20230424
LAYOUTS = {"safetensors": "model.safetensors", "hub": "pytorch_model.bin"}  # layout: its single weight file
# The model trained here (helpers.tools.train): its compact weights are committed, its checkpoint built from them.
TRAINED_NAME = TRAINED_MODEL_DIR.name
TRAINED_WEIGHTS = DATA_DIR / "trained" / f"{TRAINED_NAME}.safetensors"
TRAINED_NOTE = "a small RWKV-4 World model trained here on Shakespeare's works (helpers.tools.train); not a hub model"


def default_checkpoint_dir(shape="tiny", layout="safetensors"):
    return MODELS_DIR / (f"rwkv-4-world-{shape}" + ("-hub" if layout == "hub" else ""))


def make_config(shape, layout="safetensors", layers_and_hidden=None):
    layers, hidden = layers_and_hidden or SHAPES[shape]
    return {
        "architectures": ["RwkvForCausalLM"],
        "model_type": "rwkv",
        "vocab_size": VOCAB_SIZE,
        "context_length": CONTEXT_LENGTH,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "attention_hidden_size": hidden,
        "intermediate_size": None if layout == "hub" else 4 * hidden,
        "layer_norm_epsilon": 1e-5,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "rescale_every": 6,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": "float16",
        "transformers_version": "4.31.0",
        "offline_checkpoint": f"random weights, shape {shape}, seed {SEED}",
    }


def _read_trained(weights):
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as file:
        layers, hidden = json.loads(file.metadata()["layers_hidden"])
        return {name: file.get_tensor(name) for name in file.keys()}, (layers, hidden)


def trained_token_counts(weights=None):
    """{World id: count in the training split} of the trained model, or None without its weights file."""
    weights = Path(weights or TRAINED_WEIGHTS)
    if not weights.exists():
        return None
    tensors, _ = _read_trained(weights)
    return dict(zip(tensors["token_ids"].tolist(), tensors["token_counts"].tolist()))


def build_trained_checkpoint(weights=None, out=None):
    """Expand the model trained here (data/trained/: rows only for the ids its corpus uses) into the full
    checkpoint in the hub's layout: every other id gets a zero embedding and the shared head row."""
    weights = Path(weights or TRAINED_WEIGHTS)
    out = Path(out or TRAINED_MODEL_DIR)
    tensors, layers_and_hidden = _read_trained(weights)
    token_ids = tensors.pop("token_ids")
    tensors.pop("token_counts")
    hidden = layers_and_hidden[1]
    embeddings = torch.zeros(VOCAB_SIZE, hidden, dtype=torch.float16)
    embeddings[token_ids] = tensors["rwkv.embeddings.weight"]
    head = tensors["head.weight"][-1].repeat(VOCAB_SIZE, 1)
    head[token_ids] = tensors["head.weight"][:-1]
    tensors["rwkv.embeddings.weight"], tensors["head.weight"] = embeddings, head
    config = make_config(TRAINED_NAME, "hub", layers_and_hidden)
    del config["offline_checkpoint"]
    config["trained_here"] = TRAINED_NOTE
    config["trained_from"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    torch.save({name: tensors[name].contiguous() for name, _ in tensor_shapes(config)}, partial / LAYOUTS["hub"])
    write_tokenizer(partial)
    write_special_tokens_map(partial)
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def tensor_shapes(config):
    """(name, shape) of every weight, in the order and naming of transformers' RwkvForCausalLM."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    inner = config["intermediate_size"] or 4 * hidden
    shapes = [("rwkv.embeddings.weight", (vocab, hidden))]
    for layer in range(config["num_hidden_layers"]):
        block = f"rwkv.blocks.{layer}"
        norms = ["pre_ln", "ln1", "ln2"] if layer == 0 else ["ln1", "ln2"]
        for norm in norms:
            shapes += [(f"{block}.{norm}.weight", (hidden,)), (f"{block}.{norm}.bias", (hidden,))]
        att = f"{block}.attention"
        shapes += [(f"{att}.time_decay", (hidden,)), (f"{att}.time_first", (hidden,))]
        shapes += [(f"{att}.time_mix_{name}", (1, 1, hidden)) for name in ("key", "value", "receptance")]
        shapes += [(f"{att}.{name}.weight", (hidden, hidden)) for name in ("key", "value", "receptance", "output")]
        ffn = f"{block}.feed_forward"
        shapes += [(f"{ffn}.time_mix_{name}", (1, 1, hidden)) for name in ("key", "receptance")]
        shapes += [
            (f"{ffn}.key.weight", (inner, hidden)),
            (f"{ffn}.receptance.weight", (hidden, hidden)),
            (f"{ffn}.value.weight", (hidden, inner)),
        ]
    shapes += [("rwkv.ln_out.weight", (hidden,)), ("rwkv.ln_out.bias", (hidden,)), ("head.weight", (vocab, hidden))]
    return shapes


def make_tensor(name, shape, config):
    """Deterministic values for one weight: RWKV-4's own init for the mixing vectors, scaled noise elsewhere.

    Each tensor has its own seed, so the checkpoint can be written one layer at a time.
    """
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    generator = torch.Generator().manual_seed(SEED + zlib.crc32(name.encode()))
    layer = int(name.split(".")[2]) if name.startswith("rwkv.blocks.") else 0
    ratio_0_to_1 = layer / max(1, layers - 1)
    ratio_1_to_0 = 1.0 - layer / layers
    position = torch.arange(hidden, dtype=torch.float32) / hidden
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return torch.zeros(shape)
    if name.endswith("ln1.weight") or name.endswith("ln2.weight") or "ln_out" in name or "pre_ln" in name:
        return torch.ones(shape)
    if leaf == "time_decay":
        return -5 + 8 * (torch.arange(hidden) / (hidden - 1)) ** (0.7 + 1.3 * ratio_0_to_1)
    if leaf == "time_first":
        zigzag = torch.tensor([(i + 1) % 3 - 1 for i in range(hidden)], dtype=torch.float32) * 0.5
        return torch.full(shape, math.log(0.3)) + zigzag
    if leaf.startswith("time_mix_"):
        power = 0.5 * ratio_1_to_0 if leaf == "time_mix_receptance" and ".attention." in name else ratio_1_to_0
        offset = 0.3 * ratio_0_to_1 if leaf == "time_mix_value" else 0.0
        return (position**power + offset).clamp(max=1.0).reshape(shape)
    fan_in = shape[1]
    if name == "head.weight":
        # Noise plus a shuffled copy of the embeddings: each token strongly predicts one successor,
        # so the next-token distribution is peaked like a trained model's, not flat.
        successor = torch.randperm(shape[0], generator=generator)
        embeddings = make_tensor("rwkv.embeddings.weight", shape, config)
        return (torch.randn(shape, generator=generator) + embeddings[successor]) * 2.0 / math.sqrt(fan_in)
    std = 1.0 if "embeddings" in name else 1 / math.sqrt(fan_in)
    return torch.randn(shape, generator=generator) * std


def plan_shards(shapes, shard_bytes=None):
    """Group weights into files of at most shard_bytes (fp16; default SHARD_BYTES), 0 for a single file."""
    shard_bytes = SHARD_BYTES if shard_bytes is None else shard_bytes
    shards, current, size = [], [], 0
    for name, shape in shapes:
        nbytes = 2 * math.prod(shape)
        if current and shard_bytes and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    return shards + [current]


def write_weights(config, out, layout="safetensors", shard_bytes=None):
    """The fp16 weights in the layout's file format, in shards (and an index) where shard_bytes asks for them."""
    single = LAYOUTS[layout]
    if shard_bytes is None and layout == "hub":
        shard_bytes = 0  # one file, as the hub ships it
    shards = plan_shards(tensor_shapes(config), shard_bytes)
    if len(shards) == 1:
        file_names = [single]
    else:
        stem, suffix = single.split(".")
        file_names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{suffix}" for i in range(len(shards))]
    weight_map, total = {}, 0
    for file_name, shard in zip(file_names, shards):
        tensors = {name: make_tensor(name, shape, config).to(torch.float16).contiguous() for name, shape in shard}
        if layout == "hub":
            torch.save(tensors, out / file_name)
        else:
            save_file(tensors, str(out / file_name), metadata={"format": "pt"})
        for name, tensor in tensors.items():
            weight_map[name] = file_name
            total += tensor.nbytes
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / f"{single}.index.json").write_text(json.dumps(index, indent=2))


def vocabulary_file():
    """The World vocabulary, as the rwkv package ships it."""
    import rwkv

    return Path(rwkv.__file__).parent / tokenization_rwkv_world.VOCAB_FILE


def write_tokenizer(out):
    shutil.copyfile(vocabulary_file(), out / tokenization_rwkv_world.VOCAB_FILE)
    shutil.copyfile(tokenization_rwkv_world.__file__, out / "tokenization_rwkv_world.py")
    tokenizer_config = {
        "tokenizer_class": "RWKVWorldTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_rwkv_world.RWKVWorldTokenizer", None]},
        "model_max_length": CONTEXT_LENGTH,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def write_special_tokens_map(out):
    """The hub repos' special_tokens_map.json (the tokenizer module's defaults make it optional)."""
    special_tokens = dict.fromkeys(("bos_token", "eos_token", "unk_token", "pad_token"), tokenization_rwkv_world.END_OF_TEXT)
    (out / "special_tokens_map.json").write_text(json.dumps(special_tokens, indent=2))


def refresh_tokenizer_module(folder):
    """Give an offline checkpoint built by an older version of this project the current tokenizer module."""
    target = Path(folder) / "tokenization_rwkv_world.py"
    current = Path(tokenization_rwkv_world.__file__).read_bytes()
    if target.exists() and target.read_bytes() != current:
        target.write_bytes(current)


def build_checkpoint(shape="tiny", out=None, layout="safetensors", shard_bytes=None):
    """Write the checkpoint into `out` (a temporary folder first, so a broken build never looks complete)."""
    if shape not in SHAPES or layout not in LAYOUTS:
        raise ValueError(f"unknown shape {shape!r} or layout {layout!r}; choose from {list(SHAPES)} and {list(LAYOUTS)}")
    out = Path(out or default_checkpoint_dir(shape, layout))
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    config = make_config(shape, layout)
    write_weights(config, partial, layout, shard_bytes)
    write_tokenizer(partial)
    if layout == "hub":
        write_special_tokens_map(partial)
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def ensure_checkpoint(shape="tiny", out=None, layout="safetensors"):
    """The checkpoint folder, built first if it is missing."""
    out = Path(out or default_checkpoint_dir(shape, layout))
    if not (out / "config.json").exists():
        print(f"Building the offline {shape} checkpoint ({layout} layout) in {out} (random weights, once)...", flush=True)
        build_checkpoint(shape, out, layout)
    refresh_tokenizer_module(out)
    return out

