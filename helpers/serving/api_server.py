"""FastChat's OpenAI-compatible API server, with the checks and fault handling a public endpoint needs.

    python -m helpers.serving.api_server --controller-address http://127.0.0.1:21001 --port 8000

It is fastchat.serve.openai_api_server, unchanged where it already answers well (max_tokens below 1, a
temperature or top_p out of range: 400 with one line), plus:
- 400 with one line for a malformed body, an unknown model (naming the ones served), an empty prompt or
  chat, a prompt of token ids (FastChat would read them with OpenAI's tokenizer, which needs the internet)
  max_tokens above the context length, and presence or frequency penalties outside OpenAI's -2 to 2 (the
  worker applies both penalties, helpers.runtime.sampling);
- a worker that stops answering mid-stream ends that stream with an error event, not a cut connection (with
  OpenAI's "error" object, which the openai client raises as an APIError);
- a worker that no longer answers is dropped before a request is sent to it, so the controller routes
  to the others, and 503 with one line when none is left.
- a failure on the server's side is a 500, not FastChat's 400;
- a blank line inside a chat message becomes a line break (in the World format it ends a turn);
- a completion (a prompt, not a chat) stops only where the request says, as OpenAI's completions do:
  FastChat adds the chat template's stop, a blank line, to every request, which cut a continued text at
  its first blank line.
FastChat's handlers look up create_error_response, check_model, get_worker_address, get_gen_params and
generate_completion_stream in their module when called; this module puts its own versions there.
"""
import argparse
import os

os.environ.setdefault("LOGDIR", "")  # FastChat logs to stdout only, not into files in the current folder

import httpx  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import Depends  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from fastchat.constants import ErrorCode  # noqa: E402
from fastchat.protocol.openai_api_protocol import ErrorResponse  # noqa: E402
from fastchat.serve import openai_api_server as fastchat_api  # noqa: E402

from helpers.prompt import chat_message  # noqa: E402

MAX_TOKENS = 4096  # the context length of every RWKV-4 World model (config.json's context_length)
STATUS_TIMEOUT_S = 2.0
app = fastchat_api.app


def _error(message, status=400, code=ErrorCode.PARAM_OUT_OF_RANGE):
    return JSONResponse(ErrorResponse(message=message, code=code).dict(), status_code=status)


class NoWorker(Exception):
    def __init__(self, model):
        super().__init__(f"no worker serves {model} now; start one (python -m helpers.serving.worker) and retry")


def _limits_problem(request):
    """max_tokens beyond the context, or a penalty outside OpenAI's range (FastChat checks neither)."""
    if request.max_tokens is not None and request.max_tokens > MAX_TOKENS:
        return f"max_tokens must be between 1 and {MAX_TOKENS}, the model's context length, not {request.max_tokens}"
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(request, name)
        if value is not None and not -2.0 <= value <= 2.0:
            return f"{name} must be between -2 and 2, as in OpenAI's API, not {value}"


def _completion_problem(request):
    prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
    if not prompts or any(not isinstance(prompt, str) for prompt in prompts):
        return "prompt must be a string or a list of strings (RWKV World has its own vocabulary: send text, not token ids)"
    if any(not prompt.strip() for prompt in prompts):
        return "prompt is empty: send some text to complete"
    return _limits_problem(request)


def _chat_problem(request):
    messages = request.messages
    if isinstance(messages, str):
        return None if messages.strip() else "messages is empty: send at least one user message"
    roles = {m.get("role") for m in messages} - {"system", "user", "assistant"}
    if roles:
        return f"unknown message role {sorted(map(str, roles))[0]!r}: use system, user or assistant"
    users = [m.get("content") for m in messages if m.get("role") == "user"]
    if not users:
        return "messages has no user message: send at least one {\"role\": \"user\", \"content\": ...}"
    if not isinstance(users[-1], str) or not users[-1].strip():
        return "the last user message is empty: send some text"
    return _limits_problem(request)


async def check_model(request):
    models = await fastchat_api.fetch_remote(fastchat_api.app_settings.controller_address + "/list_models", None, "models")
    if not models:
        raise NoWorker(request.model)
    if request.model not in models:
        return _error(f"unknown model {request.model!r}; this server has {', '.join(sorted(models))}", code=ErrorCode.INVALID_MODEL)


def _world_turns(request):
    """A blank line ends a turn in the World format: inside a chat message it becomes a line break."""
    if not isinstance(request.messages, str):
        for message in request.messages:
            if isinstance(message.get("content"), str):
                message["content"] = chat_message(message["content"])


async def _answer(request, problem_of, prepare, fastchat_handler):
    problem = problem_of(request)
    if problem:
        return _error(problem)
    prepare(request)
    try:
        return await fastchat_handler(request)
    except NoWorker as error:
        return _error(str(error), status=503, code=ErrorCode.CONTROLLER_NO_WORKER)


def _checked_route(path, problem_of, prepare=lambda request: None):
    """Put a route that checks (then prepares) the request first in place of FastChat's route for path (the
    module's name for a FastChat endpoint may be another route's: it defines create_chat_completion twice)."""
    (route,) = [route for route in app.router.routes if getattr(route, "path", None) == path]
    app.router.routes.remove(route)
    request_type = route.endpoint.__annotations__["request"]

    async def checked(request: request_type):
        return await _answer(request, problem_of, prepare, route.endpoint)

    app.post(path, dependencies=[Depends(fastchat_api.check_api_key)])(checked)


_checked_route("/v1/completions", _completion_problem)
_checked_route("/v1/chat/completions", _chat_problem, prepare=_world_turns)


@app.exception_handler(RequestValidationError)
async def malformed_body(request, exc):
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return _error("malformed request body: not valid JSON", code=ErrorCode.VALIDATION_TYPE_ERROR)
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "body"
    return _error(f"malformed request body: {where}: {first.get('msg')}", code=ErrorCode.VALIDATION_TYPE_ERROR)


async def _worker_answers(address):
    try:
        async with httpx.AsyncClient() as client:
            response = await client.post(address + "/worker_get_status", timeout=STATUS_TIMEOUT_S)
        return response.status_code == 200
    except httpx.HTTPError:
        return False


async def get_worker_address(model_name):
    """The controller's choice of worker, checked first: a worker that does not answer makes the controller
    drop the workers it cannot reach, and it chooses again."""
    controller = fastchat_api.app_settings.controller_address
    for _ in range(2):
        address = await fastchat_api.fetch_remote(controller + "/get_worker_address", {"model": model_name}, "address")
        if address and await _worker_answers(address):
            return address
        await fastchat_api.fetch_remote(controller + "/refresh_all_workers")
    raise NoWorker(model_name)


def _error_event(text, code):
    """A stream's last event: FastChat's fields, and OpenAI's "error" object, which the openai client raises."""
    return {"text": text, "error_code": code, "error": {"message": text, "type": "server_error", "code": code}}


async def generate_completion_stream(payload, worker_addr):
    """FastChat's stream from a worker, ending with an error event if the worker goes away mid-answer."""
    try:
        async for content in fastchat_stream(payload, worker_addr):
            yield _error_event(content["text"], content["error_code"]) if content.get("error_code") else content
    except httpx.HTTPError as error:
        fastchat_api.logger.error(f"{worker_addr} stopped mid-answer: {error!r}")
        yield _error_event("the worker stopped mid-answer; send the request again", ErrorCode.INTERNAL_ERROR)


async def get_gen_params(model_name, worker_addr, messages, **fields):
    """FastChat's generation parameters; for a completion, without the chat template's stop (a blank line
    ends a chat turn, not a text)."""
    params = await fastchat_gen_params(model_name, worker_addr, messages, **fields)
    if isinstance(messages, str):
        stop = fields.get("stop")
        params["stop"] = [stop] if isinstance(stop, str) else list(stop or [])
    return params


def create_error_response(code, message):
    """FastChat answers every error with 400; a failure on the server's side is a 500."""
    return _error(message, status=500 if code == ErrorCode.INTERNAL_ERROR else 400, code=code)


fastchat_stream = fastchat_api.generate_completion_stream
fastchat_gen_params = fastchat_api.get_gen_params
fastchat_api.create_error_response = create_error_response
fastchat_api.get_gen_params = get_gen_params
fastchat_api.check_model = check_model
fastchat_api.get_worker_address = get_worker_address
fastchat_api.generate_completion_stream = generate_completion_stream


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--controller-address", default="http://127.0.0.1:21001")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    fastchat_api.app_settings.controller_address = args.controller_address
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
