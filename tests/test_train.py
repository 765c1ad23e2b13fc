"""The training model computes transformers' RWKV-4, and the checkpoint built from its compact weights is that
model over the full World vocabulary: checked against transformers' own RwkvForCausalLM."""
import json
from collections import Counter

import pytest
import torch

from helpers.tools import train
from helpers.measure.checkpoints import build_trained_checkpoint, trained_token_counts
from helpers.measure.perplexity import unigram_perplexity
from helpers.runtime.models import resolve_model
from helpers.runtime.loading import load_hf_model

USED = [0, 11, 33, 261, 3000, 40000]  # the World ids a toy corpus uses
TEXT = [11, 33, 5, 261, 0, 3000, 40000, 999, 11, 33, 261, 261, 40000, 0, 33, 11]  # 5 and 999 unused


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(compact model, the transformers model of the checkpoint built from it): random weights everywhere."""
    torch.manual_seed(0)
    model = train.CompactRwkv(USED, hidden=64, layers=2)
    train.initialise(model, seed=1)
    with torch.no_grad():  # RWKV's initialisation zeroes several linears: give every weight a value, as saved
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3).copy_(parameter.half().float())
        model.rwkv.embeddings.weight[-1] = 0
    folder = tmp_path_factory.mktemp("toy")
    train.save(model, Counter({token: 2 for token in USED}), {}, folder / "toy.safetensors")
    build_trained_checkpoint(folder / "toy.safetensors", folder / "checkpoint")
    source = resolve_model(str(folder / "checkpoint"))
    assert trained_token_counts(folder / "toy.safetensors") == {token: 2 for token in USED}
    return model.eval(), load_hf_model(source), source


def full_log_probs(model, logits):
    """The compact model's log-probabilities over all 65536 ids."""
    shared = logits[..., -1:]
    log_z = torch.logsumexp(torch.cat([logits[..., :-1], shared + model.log_shared], -1), -1, keepdim=True)
    full = (shared - log_z).expand(*logits.shape[:-1], 65536).clone()
    full[..., model.token_ids] = logits[..., :-1] - log_z
    return full


def test_the_built_checkpoint_is_the_trained_model(toy):
    model, reference, source = toy
    assert source.trained_here and not source.offline
    with torch.no_grad():
        logits, _ = model(model.compact(TEXT)[None])
        expected = torch.log_softmax(reference(torch.tensor([TEXT])).logits.float(), -1)
    assert torch.allclose(full_log_probs(model, logits), expected, atol=2e-4)


def test_reading_in_chunks_carries_the_state(toy):
    model, reference, _ = toy
    ids = model.compact(TEXT)[None]
    with torch.no_grad():
        whole, _ = model(ids)
        first, state = model(ids[:, :7])
        second, _ = model(ids[:, 7:], state)
    assert torch.allclose(torch.cat([first, second], 1), whole, atol=1e-5)


def test_the_loss_is_the_full_vocabulary_cross_entropy(toy):
    model, _, _ = toy
    ids = model.compact(TEXT)[None]
    with torch.no_grad():
        logits, _ = model(ids[:, :-1])
        log_probs = full_log_probs(model, logits)
    expected = -log_probs[0, torch.arange(len(TEXT) - 1), torch.tensor(TEXT[1:])].mean()
    assert model.loss(logits, ids[:, 1:]).item() == pytest.approx(expected.item(), rel=1e-5)


def test_unigram_perplexity_is_add_one():
    counts = {1: 3, 2: 1}  # 4 tokens, vocabulary of 4: probabilities (3+1)/8, (1+1)/8, 1/8, 1/8
    assert unigram_perplexity(counts, [1, 2, 3], 4) == pytest.approx((0.5 * 0.25 * 0.125) ** (-1 / 3))


def test_the_committed_model_beats_the_unigram_model_by_the_target():
    figures = json.loads(train.TRAINED_WEIGHTS.with_suffix(".json").read_text())
    assert figures["held_out_perplexity"] <= figures["unigram_perplexity"] / 2
    assert trained_token_counts() is not None and len(trained_token_counts()) == figures["distinct_ids"]
