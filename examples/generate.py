"""Predict tokens with generate() for an RWKV-4 World model in INT4 on the CPU, with BigDL-LLM.

A program to copy: it needs bigdl-llm (2.5.0b20240627) and transformers (4.31.0), or bigdl-llm's
successor ipex-llm (2.2.0) and transformers (4.37.0), nothing from this project. It is bigdl-llm's own
RWKV-4 example for PyTorch models, made to run on a CPU:

1. load the model with plain transformers, in the checkpoint's 16-bit type;
2. `model.rwkv._rescale_layers()`, as upstream's example does: it divides the weights of layer i by
   2**(i // rescale_every) once, before they are quantized (RWKV's guard against fp16 overflow), so the
   first forward does not try to divide the INT4 bytes in place ("result type Float can't be cast to the
   desired output type Byte");
3. `optimize_model(model, optimize_llm=False)`: every linear becomes INT4. `optimize_llm=False` keeps
   transformers' RWKV forwards; the library's own (the default) import `linear_q4_0` (bigdl-llm) or
   `xe_linear` (ipex-llm), which exist for Intel GPUs only.

    python examples/generate.py [--repo-id-or-model-path RWKV/rwkv-4-world-7b] [--prompt "What is AI?"] [--n-predict 32]

What this costs against `python -m helpers.tools.generate` (notebooks 02 and 03): the whole 16-bit model is held
while it converts (about 2X GB for an X-billion model), each token runs transformers' forwards (many small
tensor operations a layer) instead of one native call, and on a CPU whose vendor is not Intel
bigdl-llm picks its plain AVX kernels (set LLAMA_CPP_LIB to a faster build from bigdl/llm/libs, or call
`helpers.runtime.startup.start()` first, to choose by the CPU's flags).

Without --repo-id-or-model-path it uses RWKV_MODEL, else the small model trained here on Shakespeare
(`make checkpoint` builds it; it writes like a play, it does not answer questions).
"""
import argparse
import os
import time
from pathlib import Path

import torch
try:
    from bigdl.llm import optimize_model
except ImportError:  # ipex-llm, bigdl-llm's successor: the same API under the name ipex_llm
    from ipex_llm import optimize_model
from transformers import AutoModelForCausalLM, AutoTokenizer

# The prompt format of the model card (https://huggingface.co/RWKV/rwkv-4-world-7b), as upstream uses it.
RWKV_PROMPT_FORMAT = "Question: {prompt}\n\nAnswer:"
TRAINED_MODEL = Path(__file__).resolve().parent.parent / "data" / "models" / "rwkv-4-world-shakespeare"

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Predict tokens using the generate() API for an RWKV-4 model")
    parser.add_argument("--repo-id-or-model-path", type=str,
                        default=os.environ.get("RWKV_MODEL") or str(TRAINED_MODEL),
                        help="a hub id such as RWKV/rwkv-4-world-7b, or a local folder")
    parser.add_argument("--prompt", type=str, default="What is AI?", help="prompt to infer")
    parser.add_argument("--n-predict", type=int, default=32, help="max tokens to predict")
    args = parser.parse_args()
    model_path = args.repo_id_or_model_path

    model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype="auto", low_cpu_mem_usage=True,
                                                 trust_remote_code=True)
    model.rwkv._rescale_layers()  # before the weights become INT4 (see the top of this file)
    model = optimize_model(model, optimize_llm=False)  # INT4 linears, transformers' CPU forwards
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=True)

    with torch.inference_mode():
        prompt = RWKV_PROMPT_FORMAT.format(prompt=args.prompt)
        input_ids = tokenizer.encode(prompt, return_tensors="pt")
        start = time.perf_counter()
        output = model.generate(input_ids, max_new_tokens=args.n_predict)
        end = time.perf_counter()
        output_str = tokenizer.decode(output[0], skip_special_tokens=True)
        print(f"Inference time: {end - start} s")
        print("-" * 20, "Prompt", "-" * 20)
        print(prompt)
        print("-" * 20, "Output", "-" * 20)
        print(output_str)
