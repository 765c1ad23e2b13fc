"""Batched decoding: each sequence of a batch gets the greedy tokens it gets alone, through generate() on a
padded batch and through the server's step function, on the fused path and (make test's second pass,
RWKV_FUSED_DECODE=0) through torch."""
import pytest
import torch

from helpers.runtime.batching import decode_step, read_prompt
from helpers.runtime.loading import load_low_bit_model

PROMPTS = ["Question: Tell me about dragons.\n\nAnswer:", "Hi", "User: What is the capital of France?\n\nAI:",
           "The quick brown fox", "1, 2, 3,", "Once upon a time", "Q", "User: hello\n\nAI:", "Bonjour"]
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def model(tiny_source):
    return load_low_bit_model(tiny_source, "sym_int4")


@pytest.fixture(scope="module")
def alone(model, tokenizer):
    """Each prompt's greedy continuation, decoded on its own."""
    continuations = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        continuations.append(model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0, ids.shape[1]:].tolist())
    return continuations


@pytest.mark.parametrize("side", ["left", "right"])
def test_generate_on_a_padded_batch_gives_each_prompt_its_own_tokens(model, tokenizer, alone, side):
    tokenizer.padding_side = side
    try:
        batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = "left"
    assert not batch.attention_mask.all()  # the prompts differ in length: there is padding to keep out
    output = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    assert [row[batch.input_ids.shape[1]:].tolist() for row in output] == alone


def test_sequences_joining_and_leaving_between_steps_get_their_own_tokens(model, tokenizer, alone):
    states, tokens, generated, active = {}, {}, {i: [] for i in range(len(PROMPTS))}, []
    for step in range(3 * NEW_TOKENS):
        if step < len(PROMPTS):  # one sequence joins per step
            states[step], logits = read_prompt(model, tokenizer(PROMPTS[step], return_tensors="pt").input_ids)
            tokens[step] = int(logits.argmax())
            generated[step].append(tokens[step])
            active.append(step)
        active = [i for i in active if len(generated[i]) < NEW_TOKENS]  # finished ones leave
        if not active:
            break
        for i, logits in zip(active, decode_step(model, [tokens[i] for i in active], [states[i] for i in active])):
            tokens[i] = int(logits.argmax())
            generated[i].append(tokens[i])
    assert [generated[i] for i in range(len(PROMPTS))] == alone


@pytest.mark.parametrize("batch", [2, 5, 9])  # fused path: one by one, one group of 8, two groups
def test_a_batched_step_computes_each_sequences_logits_as_alone(model, tokenizer, batch):
    prompts = [tokenizer(prompt, return_tensors="pt").input_ids for prompt in PROMPTS[:batch]]
    states = [read_prompt(model, ids)[0] for ids in prompts]
    tokens = [int(ids[0, -1]) for ids in prompts]
    alone = [decode_step(model, [token], [[s.clone() for s in state]])[0] for token, state in zip(tokens, states)]
    together = decode_step(model, tokens, states)
    assert together.shape == (batch, model.config.vocab_size)
    assert torch.equal(together, torch.stack(alone))  # bit for bit: no near-tie can part the greedy tokens


def test_bad_batches_get_clear_messages(model, tokenizer):
    with pytest.raises(ValueError, match="one prompt, shaped"):
        read_prompt(model, torch.zeros(1, 0, dtype=torch.int64))
    state, _ = read_prompt(model, torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="one state per token"):
        decode_step(model, [1, 2], [state])
    with pytest.raises(ValueError, match="each state must be as read_prompt returns it"):
        decode_step(model, [1], [[s[0] for s in state]])  # not [1, hidden, layers]
    with pytest.raises(ValueError, match="token ids must be between 0 and 65535"):
        decode_step(model, [65536], [state])
    with pytest.raises(ValueError, match="token ids must be between 0 and 65535"):
        read_prompt(model, torch.tensor([[1, -1]]))
    batch = tokenizer(["Hi", ""], padding=True, return_tensors="pt")
    with pytest.raises(ValueError, match="every prompt of the batch needs at least one token"):
        model.generate(**batch, max_new_tokens=2, pad_token_id=0)
