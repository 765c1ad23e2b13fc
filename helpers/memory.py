"""Memory: what a model needs, what the machine has, what this process uses."""
import psutil

from helpers.errors import UserError

GIB = 1024**3

# Bytes per weight of bigdl-llm's formats (ggml blocks of 32 weights with an fp16 scale, and a
# minimum for asym_int4) and of plain torch dtypes.
BYTES_PER_WEIGHT = {
    "sym_int4": 18 / 32,
    "asym_int4": 20 / 32,
    "sym_int5": 22 / 32,
    "asym_int5": 24 / 32,
    "sym_int8": 34 / 32,
    "bf16": 2,
    "fp16": 2,
    "fp32": 4,
}


def parameter_counts(config):
    """(linear weights, other weights) of an RWKV-4 model, from its config alone."""
    hidden, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    attention = config.get("attention_hidden_size") or hidden
    inner = config.get("intermediate_size") or 4 * hidden
    per_layer = 3 * hidden * attention + attention * hidden + 2 * hidden * inner + hidden * hidden
    linear = layers * per_layer + vocab * hidden  # blocks + head
    other = vocab * hidden + layers * (9 * hidden + 2 * attention) + 4 * hidden  # embeddings, norms, mixing
    return linear, other


def weight_bytes(config, fmt):
    """Bytes of the weights in memory once loaded in `fmt` (non-linear weights stay fp32 in bigdl)."""
    linear, other = parameter_counts(config)
    if fmt in ("fp32", "bf16", "fp16"):
        return int((linear + other) * BYTES_PER_WEIGHT[fmt])
    return int(linear * BYTES_PER_WEIGHT[fmt] + other * 4)


def checkpoint_bytes(config):
    """Bytes of the fp16 checkpoint on disk."""
    return sum(parameter_counts(config)) * 2


def estimate_load_bytes(config, fmt, from_cache=False):
    """Peak memory while loading: the fp16 checkpoint is mapped while the converted copy is built."""
    if from_cache:
        return weight_bytes(config, fmt)
    return checkpoint_bytes(config) + weight_bytes(config, fmt)


def available_bytes():
    return psutil.virtual_memory().available


def check_fits(config, fmt, from_cache=False, available=None):
    """Refuse, before loading, a model whose estimated load memory exceeds the available RAM."""
    needed = estimate_load_bytes(config, fmt, from_cache)
    available = available_bytes() if available is None else available
    if needed > available:
        raise UserError(
            f"Loading this model in {fmt} needs about {needed / GIB:.1f} GiB of RAM, but only "
            f"{available / GIB:.1f} GiB is available. Close other programs, pick a smaller model "
            "(169m, 430m, 1b5, 3b) or a lower-bit format, or load a low-bit cache made elsewhere."
        )
    return needed


def rss_bytes():
    return psutil.Process().memory_info().rss
