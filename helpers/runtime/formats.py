"""bigdl-llm's low-bit weight formats this project loads, and the fused step reads, in the kernel's order; and
the mixes: a format's body with the head (the output projection to the vocabulary) kept in sym_int8, as
llama.cpp's k-quant mixes keep theirs at more bits. The head is three quarters of the small model's linear
weights and most of what 4 bits cost it (notebook 08), and about 4% of the 7B's."""

LOW_BIT_FORMATS = ("sym_int4", "asym_int4", "sym_int5", "sym_int8")
HEAD_FORMAT = "sym_int8"
MIXES = {f"{body}_head8": body for body in LOW_BIT_FORMATS if body != HEAD_FORMAT}  # name: the body's format
CHOICES = tuple(name for body in LOW_BIT_FORMATS for name in (body, *(mix for mix in MIXES if MIXES[mix] == body)))

LOW_BIT_HELP = "the weights' format; a NAME_head8 mix keeps the head in sym_int8 (default: sym_int4)"


def body_and_head(low_bit):
    """(the layers' format, the head's) of a format or mix: ("sym_int4", "sym_int8") for sym_int4_head8."""
    return (MIXES[low_bit], HEAD_FORMAT) if low_bit in MIXES else (low_bit, low_bit)
