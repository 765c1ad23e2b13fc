"""The runtime the lessons call by name: bigdl-llm's kernel build chosen for this CPU (cpu), the CPU repair
of bigdl-llm's RWKV-4 models (rwkv_cpu), the fused decoding step (fused_decode, rwkv4_decode.c), the
loaders (loading, tensor_loading, and checkpoint_files, which reads a checkpoint without trusting it) and the
low-bit cache (low_bit_cache), with memory estimates (memory). It imports nothing from the rest of helpers, the notebooks' plumbing.
"""
