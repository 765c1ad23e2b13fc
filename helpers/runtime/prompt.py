"""The prompt format of RWKV-4 World models, and the checks every entry point applies to input."""
import re

from helpers.runtime.errors import UserError

# From the model card of RWKV/rwkv-4-world-7b, as the upstream bigdl-llm example uses it.
PROMPT_FORMAT = "Question: {prompt}\n\nAnswer:"
# The upstream example's default prompt, leading newline included.
DRAGON_PROMPT = (
    "\nIn a shocking finding, scientist discovered a herd of dragons living in a remote, previously "
    "unexplored valley, in Tibet. Even more surprising to the researchers was the fact that the dragons "
    "spoke perfect Chinese."
)
DEFAULT_N_PREDICT = 40
# A blank line ends a turn in the World chat format, so BlinkDL's card for RWKV-4 World says to replace
# "\n\n" in a message by "\n" (https://huggingface.co/BlinkDL/rwkv-4-world): see chat_message.
BLANK_LINES = re.compile(r"\n\s*\n")


def chat_message(text):
    """A chat message as the World format reads it: no blank line inside (each becomes one line break)."""
    return BLANK_LINES.sub("\n", text.replace("\r\n", "\n").strip())


def format_prompt(prompt):
    if not prompt or not prompt.strip():
        raise UserError("The prompt is empty: type a question, such as \"What is AI?\".")
    return PROMPT_FORMAT.format(prompt=prompt)


def check_n_predict(n_predict, context_length):
    if not isinstance(n_predict, int) or isinstance(n_predict, bool):
        raise UserError(f"n_predict must be a whole number, not {n_predict!r}.")
    if not 1 <= n_predict <= context_length:
        raise UserError(f"n_predict must be between 1 and the model's context length {context_length}, not {n_predict}.")
