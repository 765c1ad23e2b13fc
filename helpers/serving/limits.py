"""The checks of a request's values that the API server and the worker share: a request sent straight to a
worker is checked as one sent through the API."""

MAX_CHOICES = 16  # `n` at most: each choice is a request of its own in a worker's batch
RANGES = {"temperature": (0, 2), "top_p": (0, 1), "presence_penalty": (-2, 2), "frequency_penalty": (-2, 2)}  # OpenAI's


def sampling_problem(**values):
    """A line naming the first value outside OpenAI's range (RANGES), or None; None values are not checked."""
    for name, value in values.items():
        low, high = RANGES[name]
        if value is not None and not low <= value <= high:
            return f"{name} must be between {low} and {high}, as in OpenAI's API, not {value}"


def max_tokens_problem(max_tokens, context_length):
    if max_tokens is not None and not 1 <= max_tokens <= context_length:
        return f"max_tokens must be between 1 and {context_length}, the model's context length, not {max_tokens}"
