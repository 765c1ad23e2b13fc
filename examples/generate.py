"""Predict tokens with generate() for an RWKV-4 World model in INT4 on the CPU, with BigDL-LLM.

The upstream BigDL-LLM RWKV example as you would write it today: bigdl-llm and transformers, plus one
line that repairs the newest bigdl-llm build's RWKV-4 forwards for a CPU.

    python examples/generate.py [--repo-id-or-model-path RWKV/rwkv-4-world-7b] [--prompt "What is AI?"] [--n-predict 32]

Without --repo-id-or-model-path it uses RWKV_MODEL, else the small model trained here on Shakespeare
(`make checkpoint` builds it from data/trained/; it writes like a play, it does not answer questions). bigdl-llm's from_pretrained holds the whole 16-bit
model while it converts (about 2X GB for an X-billion model); `python -m helpers.generate` loads tensor by
tensor and from a low-bit cache instead (README.md).
"""
import argparse
import os
import time
from pathlib import Path

import torch

import helpers  # noqa: F401  (first: picks bigdl-llm's native kernels for this CPU's instruction sets)
from bigdl.llm.transformers import AutoModelForCausalLM
from helpers.runtime.rwkv_cpu import repair_for_cpu
from transformers import AutoTokenizer

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

    # Load the model in 4 bit: bigdl-llm converts every linear layer to INT4 as it loads.
    model = AutoModelForCausalLM.from_pretrained(model_path, load_in_4bit=True, trust_remote_code=True)
    # bigdl-llm 2.5.0b20240627 binds RWKV-4 forwards that need an Intel GPU (`import linear_q4_0`):
    # put CPU forwards in their place. Without this line the first forward fails.
    model = repair_for_cpu(model)
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
