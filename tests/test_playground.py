"""Notebook 05's playground, its buttons pressed as a person would, on the model trained here."""
import time

import pytest

from helpers.runtime import library
from helpers.lessons.playground import Playground


@pytest.fixture(scope="module")
def loaded():
    """A playground that loaded its model as notebook 05's does (Playground(), then load()): once for the module."""
    playground = Playground()
    playground.load()
    assert playground.model is not None, playground.message
    return playground


@pytest.fixture
def playground(loaded):
    """A fresh playground on the loaded model; a run a failed test left going is stopped."""
    playground = Playground(loaded.source, loaded.model, loaded.tokenizer)
    yield playground
    playground.stop()
    playground.wait(timeout=60)


def text_after(playground, length, timeout=120):
    """The output's length once it has grown past `length` (or the generation ended, or timeout s passed)."""
    deadline = time.monotonic() + timeout
    while len(playground.output.value) <= length and playground.running and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(playground.output.value)


def test_generate_with_a_bad_model_path_shows_the_error_and_starts_nothing():
    playground = Playground()
    playground.model_path.value = "/no/such/model"
    playground.generate()
    assert playground.message.startswith("error: No model folder at /no/such/model")
    assert playground.model is None and not playground.running


def test_the_format_picked_is_the_one_loaded():
    ggml_tensor_qtype = library.low_bit_linear().ggml_tensor_qtype
    playground = Playground()
    playground.low_bit.value = "sym_int4_head8"
    playground.load_button.click()
    assert playground.message.endswith("; in sym_int4_head8."), playground.message
    assert playground.model.head.qtype == ggml_tensor_qtype["sym_int8"]
    assert playground.model.rwkv.blocks[0].attention.key.qtype == ggml_tensor_qtype["sym_int4"]


def test_text_streams_in_a_second_generate_is_refused_and_stop_ends_the_run(playground):
    playground.prompt.value, playground.greedy.value, playground.n_predict.value = "Tell me about dragons.", True, 400
    playground.generate_button.click()
    early = text_after(playground, 0)  # the prompt is read first: seconds on a 7B
    assert 0 < early < text_after(playground, early), "the text should grow while the run goes on"
    playground.generate_button.click()
    assert playground.message == "Already generating: press Stop first."
    playground.stop_button.click()
    assert playground.wait(timeout=30), "Stop should end the generation thread"
    assert len(playground.history) == 1
    run = playground.history[-1]
    assert run["stopped"] and run["tokens"] < 400
    assert playground.message == "Stopped."
    assert "first token" in playground.stats.value and "tokens/s" in playground.stats.value
    assert not playground.generate_button.disabled and playground.stop_button.disabled


def test_an_empty_prompt_gets_the_clear_message_and_starts_nothing(playground):
    playground.prompt.value = ""
    playground.generate_button.click()
    assert playground.message.startswith("error: The prompt is empty")
    assert not playground.running and playground.history == []


def test_a_full_run_gives_n_predict_tokens_and_its_text_in_the_output_box(playground):
    playground.prompt.value, playground.n_predict.value = "What is AI?", 20
    playground.generate_button.click()
    assert playground.wait(timeout=300)
    run = playground.history[-1]
    assert run["tokens"] == 20 and not run["stopped"]
    assert playground.message == "Done."
    assert playground.output.value == run["text"] != ""
