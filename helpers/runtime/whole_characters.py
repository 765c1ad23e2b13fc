"""Text decoded token by token, whole characters only: RWKV World's tokens are bytes, a character's UTF-8
bytes can be split over several tokens, and a piece that ends inside a character waits for the rest.
The widgets' streaming and the serving worker both stream through it.

The tokens' bytes come from the World vocabulary file that every World model folder has, whichever
tokenizer code the folder ships; they go through Python's incremental UTF-8 decoder, so the pieces joined
are exactly tokenizer.decode() of all the tokens (bytes that cannot be UTF-8 become U+FFFD at once).
"""
import codecs
import functools
from pathlib import Path

from helpers.runtime.errors import UserError
from helpers.runtime.tokenization_rwkv_world import VOCAB_FILE, read_vocab


@functools.cache
def _vocabulary_bytes(path):
    return {idx: token for token, idx in read_vocab(path).items()}


def token_bytes(tokenizer):
    """{token id: its bytes} of a World tokenizer, from its vocabulary file (the end of text, id 0, has none)."""
    path = Path(getattr(tokenizer, "vocab_file", None) or Path(tokenizer.name_or_path) / VOCAB_FILE)
    if not path.is_file():
        raise UserError(f"{tokenizer.name_or_path} has no {VOCAB_FILE}: streaming needs an RWKV World tokenizer's "
                        "vocabulary file in the model folder")
    return _vocabulary_bytes(str(path.resolve()))


class WholeCharacters:
    """Feed token ids one at a time; each add returns the text they complete, end() what an unfinished
    character's bytes show as (U+FFFD). An id without bytes (the end of text) adds nothing."""

    def __init__(self, token_bytes):
        self.token_bytes = token_bytes  # {id: bytes}
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token):
        return self.decoder.decode(self.token_bytes.get(token, b""))

    def end(self):
        return self.decoder.decode(b"", final=True)
