"""bigdl-llm's low-bit weight formats this project loads, and the fused step reads, in the kernel's order."""

LOW_BIT_FORMATS = ("sym_int4", "asym_int4", "sym_int5", "sym_int8")
