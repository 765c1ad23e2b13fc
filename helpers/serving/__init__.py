"""Serving RWKV-4 behind an OpenAI-compatible API with FastChat: the batching scheduler (scheduler), the
model worker (worker), the API server with its checks (api_server), the stack on one machine (stack, run by
`python -m helpers.serving` and `make serve`) and the load test the serving notebook runs (load_test).
"""
