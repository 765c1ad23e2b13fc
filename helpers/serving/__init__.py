"""Serving RWKV-4 behind an OpenAI-compatible API with FastChat: the batching scheduler that reads prompts in
chunks (scheduler), the states kept for prompt prefixes (state_cache), the model worker (worker), the API
server with its checks (api_server), the checks both apply (limits), the HTTP plumbing that stops work for a
gone client (http), the stack on one machine (stack, run by `python -m helpers.serving` and `make serve`), and
the measurements the serving notebook shows: the load test and soak (load_test) and how prompts are read
(prompt_bench).
"""
