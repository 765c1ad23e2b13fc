from pathlib import Path

import pytest
import rwkv
from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

from conftest import SAMPLE_TEXTS
from helpers.runtime.tokenization_rwkv_world import VOCAB_FILE


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
