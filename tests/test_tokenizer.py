import threading
from pathlib import Path

import pytest
import rwkv
from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

from conftest import SAMPLE_TEXTS
from helpers.runtime.paths import DATA_DIR
from helpers.runtime.tokenization_rwkv_world import VOCAB_FILE, read_vocab


@pytest.fixture(scope="module")
def reference():
    return TRIE_TOKENIZER(str(Path(rwkv.__file__).parent / VOCAB_FILE))


def test_loaded_through_auto_tokenizer_remote_code(tokenizer):
    assert type(tokenizer).__name__ == "RWKVWorldTokenizer"
    assert type(tokenizer).__module__.startswith("transformers_modules.")


@pytest.mark.parametrize("kind", SAMPLE_TEXTS)
def test_ids_equal_reference_tokenizer(tokenizer, reference, kind):
    text = SAMPLE_TEXTS[kind]
    assert tokenizer(text).input_ids == reference.encode(text)


def test_special_token_text_is_encoded_as_text(tokenizer, reference):
    text = "Question: what does <|endoftext|> mean?\n\nAnswer:"
    assert tokenizer(text).input_ids == reference.encode(text)
    assert 0 not in tokenizer(text).input_ids
    assert tokenizer.decode(tokenizer(text).input_ids) == text


@pytest.mark.parametrize("kind", SAMPLE_TEXTS)
def test_decode_round_trips(tokenizer, kind):
    text = SAMPLE_TEXTS[kind]
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_token_zero_is_end_of_text(tokenizer):
    assert tokenizer.eos_token_id == 0
    ids = tokenizer("Hello").input_ids
    assert tokenizer.decode(ids + [0], skip_special_tokens=True) == "Hello"
    assert len(tokenizer) == 65530


def test_an_id_without_a_token_decodes_to_no_text(tokenizer):
    hello = tokenizer("Hello").input_ids
    assert tokenizer.decode(hello + [65534] + hello) == tokenizer.decode(hello + hello)


class CountingDict(dict):
    def __init__(self, table):
        super().__init__(table)
        self.lookups = 0

    def get(self, key, default=None):
        self.lookups += 1
        return super().get(key, default)


def test_encoding_takes_a_few_lookups_a_byte(tokenizer):
    # Linear: the old matcher tried up to 128 slices a token (about 100 lookups a byte here); each byte of a
    # token is looked up once now, and the few after it that only begin longer tokens once more.
    data = (DATA_DIR / "heldout" / "tempest.txt").read_bytes()[:20000]
    ours = type(tokenizer)(tokenizer.vocab_file)
    ours.prefixes = CountingDict(ours.prefixes)
    ids = ours.encode_bytes(data)
    assert ids == tokenizer.encode_bytes(data) and ours.prefixes.lookups <= 1.5 * len(data)


def test_a_byte_without_a_token_is_refused_in_one_line(tokenizer, tmp_path):
    # A damaged (or foreign) vocabulary: no token holds "~". The old matcher looped forever on it.
    damaged = tmp_path / VOCAB_FILE
    lines = Path(tokenizer.vocab_file).read_text(encoding="utf-8").splitlines(keepends=True)
    damaged.write_text("".join(line for line in lines if "~" not in line.split(" ", 1)[1]), encoding="utf-8")
    foreign = type(tokenizer)(str(damaged))
    finished = []
    worker = threading.Thread(target=lambda: finished.append(attempt(foreign, "a ~ b")), daemon=True)
    worker.start()
    worker.join(10)
    assert finished == [f"byte 0x7e (at 2) has no token in {damaged}: the file is damaged, or not RWKV World's vocabulary"]
    assert foreign("a b").input_ids == tokenizer("a b").input_ids


def attempt(tokenizer, text):
    try:
        return tokenizer(text).input_ids
    except ValueError as error:
        return str(error)


def test_a_vocabulary_line_whose_length_is_wrong_is_refused(tmp_path):
    bad = tmp_path / VOCAB_FILE
    bad.write_text("1 'ab' 3\n", encoding="utf-8")
    with pytest.raises(ValueError, match="is not an RWKV World vocabulary: line \"1 'ab' 3\" says 3 bytes for a token of 2"):
        read_vocab(bad)


def test_streamed_pieces_are_exactly_the_decoded_text(tokenizer, reference):
    """Pieces of any ids (bytes of split characters, invalid bytes, the end of text, ids without a token), joined,
    are the reference tokenizer's bytes decoded at once."""
    from hypothesis import example, given, settings, strategies as st

    from helpers.runtime.whole_characters import WholeCharacters, token_bytes

    single_bytes = sorted(idx for idx, token in reference.idx2token.items() if len(token) == 1 and token[0] >= 0x80)
    table = token_bytes(tokenizer)
    euro = [reference.token2idx[bytes([byte])] for byte in "\u20ac".encode()]

    @settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @example(euro[:1] + [0] * 4 + euro[1:])  # a character's bytes six tokens apart
    @given(st.lists(st.one_of(st.integers(0, 65535), st.sampled_from(single_bytes)), max_size=40))
    def check(ids):
        characters = WholeCharacters(table)
        pieces = [characters.add(idx) for idx in ids] + [characters.end()]
        known = [idx for idx in ids if idx in reference.idx2token]
        assert "".join(pieces) == reference.decodeBytes(known).decode("utf-8", errors="replace")
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)

    check()
