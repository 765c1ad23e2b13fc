"""RWKV's memory of a text is its state: five [1, hidden, layers] tensors, the same few megabytes after 10
tokens or 10,000. The worker keeps the states after recent prompts' prefixes (chat turns, a shared
system prompt) so that a request that begins with one reads only what follows it.

    cache = StateCache(max_bytes=256 * 2**20, text_of=...)
    cache.put(token_ids, state)                 # a copy of the state after reading exactly these tokens
    length, state = cache.longest_prefix(ids)   # the longest cached prefix of ids (shorter than ids), a copy
    ids, length = cache.longest_text(data)      # the ids of the longest cached text that data begins with

Entries are keyed by their exact token ids and evicted least recently used first, so that the states and
their keys stay within max_bytes. Reading a prefix's state and then the rest gives the state of reading
everything at once: on the fused path the very same numbers (each token's arithmetic does not depend on
the tokens read with it), so the same greedy tokens as a run without the cache. A state kept at an
answer's end comes from decoding steps, which round differently from reading the same tokens as a prompt:
the turn after it gets the tokens of a chat that carries its state.

A chat's history comes back as text, and a text the model wrote in other tokens than the tokenizer's
(" " then " I" where the tokenizer reads "  " then "I", say) would not find its state by token ids: with
text_of (token ids -> their bytes), each entry keeps its text too, and the worker tokenizes a prompt as the
ids of the longest cached text it begins with, then the rest.
"""
import threading
from array import array
from collections import OrderedDict

STATE_CACHE_MB = 256  # a worker's default: ~260 states of the 1.5B model (1 MB each), ~100 of the 7B (2.6 MB)


def _key(ids):
    return array("i", ids).tobytes()  # 4 bytes a token: prefixes compare as bytes, at C speed


def state_bytes(state):
    return sum(tensor.numel() * tensor.element_size() for tensor in state)


class StateCache:
    """Least recently used states after token prefixes, at most max_bytes of states and keys; thread-safe."""

    def __init__(self, max_bytes, text_of=None):
        self.max_bytes, self.bytes, self.text_of = max_bytes, 0, text_of
        self.entries = OrderedDict()  # {key: state}, least recently used first
        self.texts = {}  # {key: the UTF-8 bytes its ids stand for}, where text_of gives them
        self.hits = self.misses = self.tokens_reused = 0
        self.lock = threading.Lock()

    def put(self, ids, state):
        """Keep a copy of `state`, the state after reading exactly `ids` (unless it alone is over max_bytes)."""
        key = _key(ids)
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                return
        text = self.text_of(ids) if self.text_of else None  # outside the lock: the ids' text takes time to decode
        size = len(key) + len(text or b"") + state_bytes(state)
        with self.lock:
            if key in self.entries or size > self.max_bytes:
                return
            while self.bytes + size > self.max_bytes:
                old_key, old_state = self.entries.popitem(last=False)
                self.bytes -= len(old_key) + len(self.texts.pop(old_key, b"")) + state_bytes(old_state)
            self.entries[key] = [tensor.clone() for tensor in state]
            if text is not None:
                self.texts[key] = text
            self.bytes += size

    def longest_prefix(self, ids):
        """(length, a copy of its state) of the longest cached prefix of ids that leaves at least one token to
        read (its logits give the first token), or (0, None); counted as a hit or a miss."""
        key = _key(ids)
        with self.lock:
            found = max((cached for cached in self.entries if len(cached) < len(key) and key.startswith(cached)),
                        key=len, default=None)
            if found is None:
                self.misses += 1
                return 0, None
            self.entries.move_to_end(found)
            self.hits += 1
            length = len(found) // 4
            self.tokens_reused += length
            return length, [tensor.clone() for tensor in self.entries[found]]

    def longest_text(self, data):
        """(token ids, length in bytes) of the longest cached text that the UTF-8 bytes `data` begin with, ending
        between two characters and leaving at least one byte to read, or ([], 0)."""
        with self.lock:
            found = max((key for key, text in self.texts.items() if len(text) < len(data) and data.startswith(text)
                         and not 0x80 <= data[len(text)] < 0xC0), key=lambda key: len(self.texts[key]), default=None)
            return ([], 0) if found is None else (array("i", found).tolist(), len(self.texts[found]))

    def status(self):
        with self.lock:
            return {"state_cache_hits": self.hits, "state_cache_misses": self.misses,
                    "state_cache_tokens_reused": self.tokens_reused, "state_cache_entries": len(self.entries),
                    "state_cache_mb": round(self.bytes / 2**20, 1), "state_cache_max_mb": round(self.max_bytes / 2**20, 1)}
