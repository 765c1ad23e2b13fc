"""Serving RWKV-4 behind an OpenAI-compatible API with FastChat: the batching scheduler (scheduler), the
model worker (worker), the API server with its checks (api_server), the checks both apply (limits), the
HTTP plumbing that stops work for a gone client (http), the stack on one machine (stack, run by
`python -m helpers.serving` and `make serve`) and the load test and soak the serving notebook shows (load_test).
"""
