"""The RWKV-4 World model sizes: (layers, hidden) of each shape, with the vocabulary and context length
every one of them shares. The feed-forward is 4x hidden."""

SHAPES = {
    "tiny": (12, 256),
    "169m": (12, 768),
    "430m": (24, 1024),
    "1b5": (24, 2048),
    "3b": (32, 2560),
    "7b": (32, 4096),
}
VOCAB_SIZE = 65536
CONTEXT_LENGTH = 4096
