"""Serving RWKV-4 behind an OpenAI-compatible API with FastChat: the batching scheduler that reads prompts in
chunks (scheduler), the states kept for prompt prefixes (state_cache), the model worker's command line (worker)
and the worker itself (rwkv_worker, imported once the process is pinned), the API server with its checks
(api_server), the checks both apply (limits), the HTTP plumbing that stops work for a gone client (http), and
the stack on one machine (stack, run by `python -m helpers.serving` and `make serve`). What is measured on it
lives in helpers.measure and helpers.tools.load_test / prompt_bench.
"""
