"""What a low-bit format costs in quality, measured as the field measures it: perplexity on held-out text,
and how far each format's next-token distribution moves from FP32's (python -m helpers.tools.perplexity prints
and commits it).

For each format and decoding path (the fused step, and bigdl-llm's torch path) ``measure`` gives perplexity,
the KL divergence from FP32's next-token distribution (mean and 99th percentile over positions) and the share
of positions where its most likely next token is FP32's. The text streams through the model in chunks that
carry the state, RWKV's way, so memory stays flat however long the text. Every format reads the same tokens.
The "unigram" row is the add-one unigram model of the trained model's training tokens, the baseline any
language model must beat. FP32 is skipped with one line where it does not fit in memory (then there is no KL
or agreement).
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from helpers.runtime.errors import UserError
from helpers.runtime.formats import CHOICES
from helpers.runtime.fused_decode import torch_path
from helpers.runtime.memory import available_bytes, weight_bytes
from helpers.runtime.paths import DATA_DIR
from helpers.runtime.rwkv_cpu import repair_for_cpu
from helpers.measure.checkpoints import trained_token_counts

FORMATS = ("fp32",) + CHOICES
QUALITY_DIR = DATA_DIR / "quality"  # committed runs: python -m helpers.tools.perplexity --json data/quality/NAME.json
PATHS = ("fused", "torch")
CHUNK = 256  # tokens read per call; the state carries the rest


@dataclass
class Row:
    format: str
    path: str
    perplexity: float
    kl_mean: float | None  # nats, from FP32's next-token distribution
    kl_p99: float | None
    top1_agreement: float | None  # share of positions whose most likely next token is FP32's
    tokens: int  # positions scored


class Scores:
    """Running sums for one model: the log-probability of each next token, and against FP32."""

    def __init__(self):
        self.nll, self.kl, self.agree = 0.0, [], 0

    def add(self, log_probs, targets, reference=None):
        self.nll -= log_probs.gather(-1, targets[:, None]).double().sum().item()
        if reference is not None:
            self.kl.append((reference.exp() * (reference - log_probs)).sum(-1))
            self.agree += (reference.argmax(-1) == log_probs.argmax(-1)).sum().item()

    def row(self, fmt, path, tokens):
        kl = torch.cat(self.kl) if self.kl else None
        return Row(fmt, path, math.exp(self.nll / tokens),
                   None if kl is None else kl.mean().item(),
                   None if kl is None else torch.quantile(kl, 0.99).item(),
                   None if kl is None else self.agree / tokens, tokens)


class Stream:
    """A model reading the text chunk by chunk, carrying its state."""

    def __init__(self, model, through_torch=False):
        self.model, self.through_torch, self.state = model, through_torch, None

    def log_probs(self, ids):
        with torch.inference_mode():
            if self.through_torch:
                with torch_path(self.model):
                    out = self.model(ids[None], state=self.state, use_cache=True)
            else:
                out = self.model(ids[None], state=self.state, use_cache=True)
        self.state = out.state
        return torch.log_softmax(out.logits[0].float(), dim=-1)


def read_text_ids(tokenizer, text_file, max_tokens=None):
    path = Path(text_file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"Cannot read the text {path} ({error}); pass a UTF-8 text file with --text.") from None
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
    ids = ids if max_tokens is None else ids[:max_tokens + 1]
    if len(ids) < 2:
        raise UserError(f"{path} has {len(ids)} token(s); perplexity needs a text of at least two tokens.")
    return ids


def check_formats(formats):
    unknown = [fmt for fmt in formats if fmt not in FORMATS]
    if unknown or not formats:
        raise UserError(f"Unknown format(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(FORMATS)}.")


def load_fp32(source, report):
    """FP32 as transformers loads it, on the CPU forwards (the same maths), or None where it does not fit."""
    try:
        from helpers.runtime.loading import load_hf_model  # after startup.start(): it imports the low-bit library

        return repair_for_cpu(load_hf_model(source))
    except UserError as error:
        report(f"FP32 skipped: {error}")
        return None


def measure(source, ids, formats=FORMATS, paths=PATHS, report=print, progress=True):
    """Rows for every format and path asked for, all reading ids beside FP32. The low-bit models are loaded
    together where they fit in memory beside each other (FP32 then runs once), else one at a time."""
    from helpers.runtime.loading import load_model  # after startup.start(): it imports the low-bit library

    check_formats(formats)
    fp32 = load_fp32(source, report)
    fp32_row = fp32 is not None and "fp32" in formats
    rows = []
    for group in _groups(source.config, [fmt for fmt in formats if fmt != "fp32"]) or [[]]:
        streams, model = {}, None
        for fmt in group:
            model = load_model(source, fmt, report=report)
            if "fused" in paths and model.fused_forward is None:
                report(f"{fmt}: the fused step is off or cannot run here (RWKV_FUSED_DECODE=0, no C compiler, or no "
                       "AVX2); torch path only.")
            for path in paths:
                if path == "torch" or model.fused_forward is not None:
                    streams[fmt, path] = Stream(model, through_torch=path == "torch")
        rows += read_beside_fp32(streams, fp32, ids, ",".join(group) or "fp32", progress, fp32_row and not rows)
        del model, streams
    counts = trained_token_counts()
    if counts:
        targets = ids[1:].tolist()
        rows.append(Row("unigram", "-", unigram_perplexity(counts, targets, source.config["vocab_size"]),
                        None, None, None, len(targets)))
    return rows


def unigram_perplexity(counts, ids, vocab_size):
    """Perplexity on ids of the add-one (Laplace) unigram model of counts ({token id: count in training})."""
    total = sum(counts.values()) + vocab_size
    nll = -sum(math.log((counts.get(i, 0) + 1) / total) for i in ids)
    return math.exp(nll / len(ids))


def _groups(config, formats):
    together = sum(weight_bytes(config, fmt) for fmt in formats + ["fp32"])
    return [formats] if together < 0.8 * available_bytes() else [[fmt] for fmt in formats]


def read_beside_fp32(streams, fp32, ids, label, progress, fp32_row):
    """Rows of the streams ({(format, path): Stream}), and FP32's own first where fp32_row, all reading ids
    chunk by chunk beside FP32."""
    reference = Stream(fp32) if fp32 is not None else None
    scores = ({("fp32", "torch"): Scores()} if fp32_row else {}) | {key: Scores() for key in streams}
    for start in tqdm(range(0, len(ids) - 1, CHUNK), desc=label, unit="chunk", disable=not progress, leave=False):
        targets = ids[start + 1:start + CHUNK + 1]
        piece = ids[start:start + len(targets)]
        reference_log_probs = reference.log_probs(piece) if reference else None
        if fp32_row:
            scores["fp32", "torch"].add(reference_log_probs, targets)
        for key, stream in streams.items():
            scores[key].add(stream.log_probs(piece), targets, reference_log_probs)
    return [score.row(fmt, path, len(ids) - 1) for (fmt, path), score in scores.items()]


def load_rows(name):
    """The rows of a committed run, data/quality/NAME.json."""
    return [Row(**row) for row in json.loads((QUALITY_DIR / f"{name}.json").read_text())]
