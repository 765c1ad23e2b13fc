"""The RWKV World tokenizer as a transformers tokenizer.

This file is copied into every checkpoint folder the project writes, and loaded from there by
``AutoTokenizer.from_pretrained(path, trust_remote_code=True)``, the same call that loads the
Hugging Face ``RWKV/rwkv-4-world-*`` repos. It must stay self-contained (no project imports).

The World vocabulary maps byte strings to ids 1..65529; text is encoded by greedy longest match
over its UTF-8 bytes, one dictionary lookup per byte of each token (as fast as the reference
TRIE_TOKENIZER, whose ids it gives). Id 0 is the end-of-text token. Tokens are carried through
transformers as latin-1 strings, which map bytes one to one.
"""
import ast
import os
import shutil

from transformers import PreTrainedTokenizer

VOCAB_FILE = "rwkv_vocab_v20230424.txt"
END_OF_TEXT = "<|endoftext|>"


def read_vocab(path):
    """{token bytes: id} from the World vocabulary file (lines: `id repr(token) length`)."""
    vocab = {}
    with open(path, encoding="utf-8") as file:
        for line in file:
            idx, rest = line.split(" ", 1)
            literal, length = rest.rstrip("\n").rsplit(" ", 1)
            token = ast.literal_eval(literal)
            token = token.encode("utf-8") if isinstance(token, str) else token
            if len(token) != int(length):
                raise ValueError(f"{path} is not an RWKV World vocabulary: line {line.strip()!r} says "
                                 f"{length} bytes for a token of {len(token)}")
            vocab[token] = int(idx)
    return vocab


def prefix_table(vocab):
    """{bytes: token id, or None where they only begin tokens} for every prefix of every token."""
    table = {token[:end]: None for token in vocab for end in range(1, len(token))}
    table.update(vocab)
    return table


class RWKVWorldTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, **kwargs):
        self.vocab_file = vocab_file
        self.byte_to_id = read_vocab(vocab_file)
        self.prefixes = prefix_table(self.byte_to_id)
        self.id_to_text = {idx: token.decode("latin-1") for token, idx in self.byte_to_id.items()}  # as transformers carries them
        self.text_to_id = {text: idx for idx, text in self.id_to_text.items()} | {END_OF_TEXT: 0}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            kwargs.setdefault(name, END_OF_TEXT)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(**kwargs)

    @property
    def vocab_size(self):
        return len(self.byte_to_id) + 1  # + end of text, id 0

    def get_vocab(self):
        vocab = {token.decode("latin-1"): idx for token, idx in self.byte_to_id.items()}
        vocab[END_OF_TEXT] = 0
        return vocab

    def encode_bytes(self, data):
        """Greedy longest match, as the reference TRIE_TOKENIZER does: from each token's start, the bytes are
        extended while they still begin a token, and the longest that is one is taken. ValueError, naming
        the byte, where no token begins with it (a damaged or foreign vocabulary file)."""
        ids, start, lookup = [], 0, self.prefixes.get
        while start < len(data):
            end, longest = start, None
            while end < len(data) and (idx := lookup(data[start:end + 1], 0)) != 0:  # 0: no token begins so
                end += 1
                if idx is not None:
                    longest, token = end, idx
            if longest is None:
                raise ValueError(f"byte 0x{data[start]:02x} (at {start}) has no token in {self.vocab_file}: the file is "
                                 "damaged, or not RWKV World's vocabulary")
            ids.append(token)
            start = longest
        return ids

    def tokenize(self, text, **kwargs):
        """Text is encoded as text, as TRIE_TOKENIZER does: a literal "<|endoftext|>" in a prompt is bytes like
        any other, not id 0, and the spaces around it stay (transformers would split on it and strip them)."""
        return self._tokenize(text)

    def _tokenize(self, text, **kwargs):
        return [self.id_to_text[idx] for idx in self.encode_bytes(text.encode("utf-8"))]

    def convert_tokens_to_ids(self, tokens):
        """transformers' conversion, without its look-up of added tokens for each one (there are none)."""
        if tokens is None or isinstance(tokens, str):
            return super().convert_tokens_to_ids(tokens)
        return [self.text_to_id[token] for token in tokens]

    def _convert_token_to_id(self, token):
        return self.text_to_id[token]

    def _convert_id_to_token(self, index):
        # The model's head has 65536 rows, the vocabulary fewer tokens: an id without one (a random-weight
        # model can sample it) is no text, not an error.
        return END_OF_TEXT if index == 0 else self.id_to_text.get(index, "")

    def convert_tokens_to_string(self, tokens):
        return b"".join(token.encode("latin-1") for token in tokens).decode("utf-8", errors="replace")

    def save_vocabulary(self, save_directory, filename_prefix=None):
        target = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE)
        if os.path.abspath(self.vocab_file) != os.path.abspath(target):
            shutil.copyfile(self.vocab_file, target)
        return (target,)
