"""Memory: what a model needs, what the machine has, what this process uses."""
import threading
import time

import psutil

from helpers.runtime.errors import UserError
from helpers.runtime.formats import body_and_head

GIB = 1024**3

# Bits per weight of bigdl-llm's formats as stored on this CPU (blocks of weights sharing fp16
# scales, measured), and of plain torch dtypes.
BITS_PER_WEIGHT = {"sym_int4": 4.25, "asym_int4": 4.5, "sym_int5": 5.25, "sym_int8": 8.5, "bf16": 16, "fp16": 16, "fp32": 32}
BYTES_PER_WEIGHT = {name: bits / 8 for name, bits in BITS_PER_WEIGHT.items()}


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
    """Bytes of the weights in memory once loaded in `fmt`.

    Low-bit models keep the embeddings in fp16 (helpers.runtime.rwkv_cpu) and the norms and mixing vectors in fp32;
    a mix keeps its head (as large as the embeddings) in another format than its layers.
    """
    linear, other = parameter_counts(config)
    if fmt in ("fp32", "bf16", "fp16"):
        return int((linear + other) * BYTES_PER_WEIGHT[fmt])
    embeddings = config["vocab_size"] * config["hidden_size"]
    body, head = body_and_head(fmt)
    return int((linear - embeddings) * BYTES_PER_WEIGHT[body] + embeddings * (BYTES_PER_WEIGHT[head] + 2)
               + (other - embeddings) * 4)


def checkpoint_bytes(config):
    """Bytes of the checkpoint on disk (fp16, or fp32 where its config says so)."""
    return sum(parameter_counts(config)) * _checkpoint_itemsize(config)


def estimate_load_bytes(config, fmt, loader="tensor_by_tensor"):
    """Peak memory while loading in `fmt`, by the loader that will run: the converted model alone from the
    low-bit cache ("cache"); plus the checkpoint's largest tensor (embeddings or head) for this project's
    tensor-by-tensor loader; plus the whole checkpoint for transformers' and bigdl-llm's from_pretrained."""
    if loader == "cache":
        return weight_bytes(config, fmt)
    if loader == "tensor_by_tensor":
        return weight_bytes(config, fmt) + config["vocab_size"] * config["hidden_size"] * _checkpoint_itemsize(config)
    return checkpoint_bytes(config) + weight_bytes(config, fmt)


def _checkpoint_itemsize(config):
    return 4 if config.get("torch_dtype") == "float32" else 2


def available_bytes():
    return psutil.virtual_memory().available


def check_fits(config, fmt, loader="tensor_by_tensor", available=None):
    """Refuse, before loading, a model whose estimated load memory exceeds the available RAM."""
    needed = estimate_load_bytes(config, fmt, loader)
    available = available_bytes() if available is None else available
    if needed > available:
        raise UserError(
            f"Loading this model in {fmt} needs about {needed / GIB:.1f} GiB of RAM, but only "
            f"{available / GIB:.1f} GiB is available. Close other programs, pick a smaller model "
            "(169m, 430m, 1b5, 3b) or a lower-bit format, or load a low-bit cache made elsewhere."
        )
    return needed


def model_weight_bytes(model):
    """Bytes of all the weights a loaded model holds (low-bit linears as stored)."""
    return sum(tensor.nbytes for tensor in model.state_dict().values())


def rss_bytes():
    return psutil.Process().memory_info().rss


def huge_page_bytes():
    """Bytes of this process's memory on transparent huge pages (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/smaps_rollup") as rollup:
            return next((int(line.split()[1]) * 1024 for line in rollup if line.startswith("AnonHugePages:")), 0)
    except OSError:
        return 0


def peak_rss_bytes():
    """This process's peak RSS so far, its own alone: Linux's VmHWM. (getrusage's ru_maxrss is no use here: a
    process that a parent started through vfork begins with the parent's peak, which then counts as its own.)"""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


class PeakRss:
    """Context manager sampling this process's RSS in a thread; `.peak` and `.end` in bytes."""

    def __init__(self, interval=0.005):
        self.interval, self.peak, self.end = interval, 0, 0

    def __enter__(self):
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while self._running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._running = False
        self._thread.join()
        self.end = rss_bytes()
        self.peak = max(self.peak, self.end)
