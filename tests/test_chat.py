"""Notebook 06's chat box, used as a person would, on the model trained here and the notebook's own reply."""
import json

import pytest

from helpers.lessons.chat import ChatBox
from helpers.runtime.loading import load_model, load_tokenizer
from helpers.runtime.paths import REPO_ROOT

NOTEBOOK = REPO_ROOT / "notebooks" / "06_chat.ipynb"


@pytest.fixture(scope="module")
def trained_tokenizer(trained_source):
    return load_tokenizer(trained_source)


@pytest.fixture(scope="module")
def reply(trained_source, trained_tokenizer):
    """Notebook 06's reply(text, conversation, sampling=...), from the notebook's own cell (section 1), on the
    model trained here in sym_int4 as the notebook loads it: the chat box gets what it gets there."""
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    code = [source for source in ("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")
            if "def reply(" in source]
    assert len(code) == 1, f"{NOTEBOOK.name} should define reply in one code cell"
    namespace = {"model": load_model(trained_source, "sym_int4"), "tokenizer": trained_tokenizer}
    exec(code[0], namespace)
    return namespace["reply"]


@pytest.fixture
def box(reply, trained_tokenizer):
    """A fresh chat box, greedy with the `rwkv` package's penalties (temperature 0): the same answers on every run.
    An answer a failed test left going is stopped."""
    box = ChatBox(reply, trained_tokenizer)
    box.sliders["temperature"].value = 0.0
    yield box
    box.stop_button.click()
    box.wait(timeout=60)


def say(box, text):
    """Type text and press Send; True once the answer is over."""
    box.message.value = text
    box.send_button.click()
    return box.wait()


def differ(state, other):
    return any(not tensor.equal(other_tensor) for tensor, other_tensor in zip(state, other, strict=True))


def test_a_second_turn_reads_on_from_the_first_turns_state(box, reply):
    assert say(box, "Hello!")
    assert box.turns[0][1] != "", "the first answer should arrive"
    assert box.message.value == "" and "tokens" in box.status.value
    before = [tensor.clone() for tensor in box.conversation["state"]]
    assert say(box, "Tell me more.")
    assert differ(box.conversation["state"], before), "the second turn should be read into the state"
    alone = {"state": None}  # the second turn in a conversation of its own
    for _ in reply("Tell me more.", alone, sampling=box.sampling):
        pass
    assert differ(box.conversation["state"], alone["state"]), "the second turn should read on from the first's state"
    assert len(box.turns) == 2 and box.turns[1][1] != ""
    assert box.transcript.value.count("<b>User:</b>") == 2


def test_stop_ends_the_answer(box):
    box.message.value = "And then?"
    box.send_button.click()
    box.stop_button.click()
    assert box.wait(timeout=60)
    assert "stopped" in box.status.value
    assert box.conversation["state"] is not None  # reply keeps what was read, also when stopped
    assert not box.send_button.disabled and box.stop_button.disabled


def test_an_empty_message_is_refused(box):
    box.send_button.click()  # nothing typed
    assert "Type a message first" in box.status.value
    assert not box.running and box.turns == [] and box.conversation["state"] is None


def test_reset_starts_a_new_conversation_and_greedy_answers_the_same_again(box):
    assert say(box, "Hello!")
    first_answer = box.turns[0][1]
    box.reset_button.click()
    assert box.conversation["state"] is None and box.turns == [] and box.transcript.value == ""
    assert "New conversation" in box.status.value
    assert say(box, "Hello!")
    assert box.turns[0][1] == first_answer != ""


def test_the_sliders_values_reach_reply(box, reply):
    asked = []
    box.reply = lambda text, conversation, sampling: asked.append(sampling) or reply(text, conversation, sampling=sampling)
    box.sliders["presence_penalty"].value, box.sliders["top_p"].value = 0.5, 0.5
    assert say(box, "And you?")
    assert [(sampling.temperature, sampling.presence_penalty, sampling.top_p) for sampling in asked] == [(0.0, 0.5, 0.5)]
