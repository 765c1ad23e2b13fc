"""Batched decoding for a server: independent sequences join and leave between steps, and each step
reads one token of every sequence with the weights read once for all of them.

    state, logits = read_prompt(model, prompt_ids)           # a sequence joins: its prompt, alone
    logits = decode_step(model, [token_a, token_b], [state_a, state_b])  # one token of each, together

A state is transformers' five [1, hidden, layers] tensors, one set per sequence, updated in place.
Greedy tokens are those of decoding each sequence alone. On the fused path a step is one native call
on the sequences' own tensors; through torch the states are stacked for the call and copied back.
"""
import torch

from helpers.runtime.rwkv_state import check_token_ids


def read_prompt(model, input_ids):
    """(state, logits [vocab] of the prompt's last token) for prompt token ids [1, tokens]."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError("read_prompt takes the token ids of one prompt, shaped [1, tokens] with tokens >= 1")
    check_token_ids(input_ids, model.config.vocab_size)
    with torch.no_grad():
        output = model(input_ids, use_cache=True, last_logits_only=True)
    return [s.contiguous() for s in output.state], output.logits[0, -1]


def decode_step(model, tokens, states):
    """Logits [len(tokens), vocab]: reads tokens[i] continuing states[i], for every i in one step."""
    if len(tokens) != len(states) or not tokens:
        raise ValueError("decode_step needs one state per token, and at least one token")
    ids = torch.tensor(tokens, dtype=torch.int64).unsqueeze(1)
    check_token_ids(ids, model.config.vocab_size)
    shape = (1, model.config.hidden_size, model.config.num_hidden_layers)
    if any(len(state) != 5 or any(s.shape != shape or s.dtype != torch.float32 or not s.is_contiguous() for s in state)
           for state in states):
        raise ValueError(f"each state must be as read_prompt returns it: five float32 tensors of shape {list(shape)}")
    return read_tokens(model, ids, states)


def read_tokens(model, ids, states):
    """Logits [sequences, vocab] of the last of the token ids [sequences, tokens], row i continuing states[i]
    (updated in place): a decoding step, or one call for a chunk of several prompts (a server's scheduler)."""
    with torch.no_grad():
        fused = getattr(model, "fused_forward", None)
        if fused is not None:
            return fused.run(ids, states)[:, -1]
        stacked = [torch.cat([state[k] for state in states]) for k in range(5)]
        output = model(ids, state=stacked, use_cache=True, last_logits_only=True)
        for row, state in enumerate(states):
            for k in range(5):
                state[k].copy_(output.state[k][row:row + 1])
        return output.logits[:, -1]
