"""The checks the API server, the worker and the stack share: a request's values (a request sent straight to
a worker is checked as one sent through the API), and where the API server may listen without keys."""
import ipaddress

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


def is_loopback(host):
    """Whether only this machine can reach an address (without API keys, the API server listens on no other)."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any address
        return False


def no_keys_problem(host, keys, how_to_pass):
    if not keys and not is_loopback(host):
        return (f"refusing to listen on {host} without API keys: anyone who reaches it could use the model. "
                f"Pass {how_to_pass}, or listen on 127.0.0.1.")
