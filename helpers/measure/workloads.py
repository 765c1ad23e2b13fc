"""What the measuring tools feed a model or a server: fixed prompts, the same for every option and run."""
PROMPT_TOKENS = 32
DECODE_TOKENS = 64  # greedy tokens the benchmark times after the prompt
BATCH_STEPS, BATCH_ROUNDS = 16, 3  # a batch size's steps in a round, and its rounds (the sizes taking turns)
# The benchmark's options beyond a format's name: sym_int4 decoded through torch and bigdl's kernels, without
# helpers.runtime.fused_decode; loaded by bigdl-llm's from_pretrained instead of tensor by tensor.
UNFUSED, FROM_PRETRAINED = "_unfused", "_from_pretrained"
QUESTIONS = [f"Question: {question}\n\nAnswer:" for question in
             ("What is AI?", "Why is the sky blue?", "What is a CPU?", "How do trains work?")]


def prompt_ids(vocab_size):
    """A fixed 32-token prompt: the same ids for every option."""
    import torch

    return (torch.arange(PROMPT_TOKENS) * 7919 % (vocab_size - 1) + 1).unsqueeze(0)


def batch_prompts(vocab_size, count):
    """count different prompts of different lengths (8 to 8 + count - 1 tokens)."""
    import torch

    return [((torch.arange(8 + i) + 97 * i) * 7919 % (vocab_size - 1) + 1).unsqueeze(0) for i in range(count)]
