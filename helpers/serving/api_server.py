"""FastChat's OpenAI-compatible API server, with the checks and fault handling a public endpoint needs.

    python -m helpers.serving.api_server --controller-address http://127.0.0.1:21001 --port 8000
        [--host 10.0.0.1 --api-keys KEY1,KEY2]          (keys from RWKV_API_KEYS when the flag is not given)

It is fastchat.serve.openai_api_server, unchanged where it already answers well (max_tokens below 1, a
temperature or top_p out of range: 400 with one line), plus:
- its routes are /v1/models, /v1/completions, /v1/chat/completions, /health and the embeddings routes,
  which answer 400 with one line (RWKV-4 World is a language model, not an embedding model); FastChat's
  /api/v1 routes, which skipped every check, are gone;
- 400 with one line for a malformed body, an unknown model (naming the ones served), an empty prompt or
  chat, a prompt of token ids (FastChat would read them with OpenAI's tokenizer, which needs the internet),
  max_tokens above the context length, n above MAX_CHOICES, and penalties outside OpenAI's -2 to 2 (the
  worker applies both penalties, helpers.runtime.sampling, and checks the same values: helpers.serving.limits);
- 429 with Retry-After and one line when every worker's queue is full; 503 when no worker answers; 500
  (not FastChat's 400) for a failure on the server's side; 401 with one line without a valid API key;
- a worker is asked whether it is healthy and has room before a request is sent to it, so the controller
  routes to the others;
- a worker that stops answering mid-stream ends that stream with an error event, not a cut connection (with
  OpenAI's "error" object, which the openai client raises as an APIError);
- a worker's stream carries only the text each chunk adds (helpers.serving.worker); FastChat's handlers get
  the text so far, as from FastChat's own workers;
- a client that goes stops its work at once, streamed or not (helpers.serving.http);
- a blank line inside a chat message becomes a line break (in the World format it ends a turn), and an answer
  sent back keeps the spaces it began with, so that a chat's history is the text the model read and wrote;
- a completion (a prompt, not a chat) stops only where the request says, as OpenAI's completions do:
  FastChat adds the chat template's stop, a blank line, to every request, which cut a continued text at
  its first blank line.
It refuses to listen on an address other hosts can reach without API keys.
FastChat's handlers look up create_error_response, check_model, get_worker_address, get_gen_params,
generate_completion_stream and fetch_remote in their module when called: install() puts this module's versions
there and its routes on FastChat's app, once, before the server starts (main does). Every request to the
controller and the workers goes through one HTTP client, opened with the server and closed with it.
"""
import argparse
import json
import sys
import time

from helpers.runtime import settings
from helpers.runtime.errors import one_line_errors

settings.keep_fastchat_logs_on_stdout()  # before fastchat is imported
settings.keep_fastchat_app_settings_out_of_the_environment()  # main() gives FastChat its settings itself

import httpx  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import Depends, HTTPException, Request  # noqa: E402
from fastapi.exception_handlers import http_exception_handler  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse, Response, StreamingResponse  # noqa: E402
from fastchat.constants import ErrorCode  # noqa: E402
from fastchat.protocol.openai_api_protocol import EmbeddingsRequest, ErrorResponse  # noqa: E402
from fastchat.serve import openai_api_server as fastchat_api  # noqa: E402

from helpers.runtime.prompt import chat_message  # noqa: E402
from helpers.runtime.shapes import CONTEXT_LENGTH  # noqa: E402
from helpers.runtime.versions import warn_about_versions  # noqa: E402
from helpers.serving.http import (CLIENT_GONE, StreamWhileClientListens, closes_with_response, open_streams,  # noqa: E402
                                  remove_routes, unavailable, unless_client_goes)
from helpers.serving.limits import MAX_CHOICES, max_tokens_problem, no_keys_problem, sampling_problem  # noqa: E402

STATUS_TIMEOUT_S = 2.0
FETCH_TIMEOUT_S = fastchat_api.fetch_timeout.total  # FastChat's, for a whole answer that is not streamed
WORKER_CHOICES = 4  # the controller's choices of worker tried for one request
HEALTH_CACHE_S = 1.0  # /health asks no key: its answer is reused this long, so calling it costs the workers little
app = fastchat_api.app


def _error(message, status=400, code=ErrorCode.PARAM_OUT_OF_RANGE, headers=None):
    return JSONResponse(ErrorResponse(message=message, code=code).dict(), status_code=status, headers=headers)


class NoWorker(Exception):
    def __init__(self, model):
        super().__init__(f"no worker serves {model} now; start one (python -m helpers.serving.worker) and retry")


class WorkersFull(Exception):
    def __init__(self, model, retry_after_s):
        super().__init__(f"every worker serving {model} is full; retry later (Retry-After says when)")
        self.retry_after_s = retry_after_s


def _limits_problem(request):
    """max_tokens beyond the context, too many choices, or a penalty outside OpenAI's range (FastChat checks none)."""
    if request.n is not None and request.n > MAX_CHOICES:
        return f"n must be between 1 and {MAX_CHOICES} on this server, not {request.n}"
    return max_tokens_problem(request.max_tokens, CONTEXT_LENGTH) or sampling_problem(
        presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty)


def _not_unicode(text):
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:  # a lone surrogate, which JSON's \\ud800 escapes can carry
        return True


def _completion_problem(request):
    prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
    if not prompts or any(not isinstance(prompt, str) for prompt in prompts):
        return "prompt must be a string or a list of strings (RWKV World has its own vocabulary: send text, not token ids)"
    if any(not prompt.strip() for prompt in prompts):
        return "prompt is empty: send some text to complete"
    if any(map(_not_unicode, prompts)):
        return "prompt is not valid Unicode text"
    return _limits_problem(request)


def _chat_problem(request):
    messages = request.messages
    if isinstance(messages, str):
        return None if messages.strip() else "messages is empty: send at least one user message"
    roles = {m.get("role") for m in messages} - {"system", "user", "assistant"}
    if roles:
        return f"unknown message role {sorted(map(str, roles))[0]!r}: use system, user or assistant"
    if any(not isinstance(m.get("content"), str) for m in messages):
        return "every message needs its text as \"content\""
    if any(_not_unicode(m["content"]) for m in messages):
        return "a message is not valid Unicode text"
    users = [m["content"] for m in messages if m["role"] == "user"]
    if not users:
        return "messages has no user message: send at least one {\"role\": \"user\", \"content\": ...}"
    if not users[-1].strip():
        return "the last user message is empty: send some text"
    return _limits_problem(request)


_http = {}  # "client": this server's one httpx.AsyncClient, while it runs


async def _open_client():
    _http["client"] = httpx.AsyncClient(headers=fastchat_api.headers,
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))


async def _close_client():
    await _http.pop("client").aclose()


async def fetch_remote(url, payload=None, name=None):
    """FastChat's fetch_remote on this server's client: the answer's JSON (its field `name` where one is named,
    all of it for ""), its bytes without a name, or an error's JSON text for a status other than 200."""
    response = await _http["client"].post(url, json=payload, timeout=FETCH_TIMEOUT_S)
    if response.status_code != 200:
        return json.dumps({"text": response.reason_phrase, "error_code": ErrorCode.INTERNAL_ERROR})
    if name is None:
        return response.content
    answer = response.json()
    return answer[name] if name else answer


async def check_model(request):
    models = await fetch_remote(fastchat_api.app_settings.controller_address + "/list_models", None, "models")
    if not models:
        raise NoWorker(request.model)
    if request.model not in models:
        return _error(f"unknown model {request.model!r}; this server has {', '.join(sorted(models))}", code=ErrorCode.INVALID_MODEL)


def _world_turns(request):
    """A blank line ends a turn in the World format: inside a chat message it becomes a line break. An answer
    sent back keeps the spaces it began with but one, which the template writes after "AI:", so that the
    history reads as the model wrote it (the worker then finds its state)."""
    if not isinstance(request.messages, str):
        for message in request.messages:
            text = message["content"]
            spaces = len(text) - len(text.lstrip(" ")) if message["role"] == "assistant" else 0
            message["content"] = " " * max(0, spaces - 1) + chat_message(text)


def _null_means_default(request):
    """A field sent as null gets its default: FastChat's handlers count with n, max_tokens and others."""
    for name, model_field in type(request).__fields__.items():
        if getattr(request, name) is None and model_field.default is not None:
            setattr(request, name, model_field.default)


async def _answer(request, connection, problem_of, prepare, fastchat_handler):
    _null_means_default(request)
    problem = problem_of(request)
    if problem:
        return _error(problem)
    prepare(request)
    try:
        if request.stream:
            return await _stream(fastchat_handler(request), connection)
        answered, response = await unless_client_goes(connection, fastchat_handler(request))
        return response if answered else Response(status_code=CLIENT_GONE)
    except NoWorker as error:
        return _error(str(error), status=503, code=ErrorCode.CONTROLLER_NO_WORKER)
    except WorkersFull as error:
        return _overloaded(str(error), error.retry_after_s)
    except httpx.HTTPError:
        return _error(_controller_silent(), status=503, code=ErrorCode.CONTROLLER_NO_WORKER)


def _controller_silent():
    return (f"the controller at {fastchat_api.app_settings.controller_address} does not answer; start it "
            "(make serve does) or give the API server its address (--controller-address)")


async def _stream(handled, connection):
    """FastChat's streamed answer, once its first event from a worker has come: a worker's refusal then (its
    queue full, a value it refuses) is answered with its status, 429 or 400, not a stream of one error event."""
    streams = open_streams()  # the worker streams opened for this answer: closed with it (helpers.serving.http)
    response = await handled
    if not isinstance(response, StreamingResponse):
        return response
    body = response.body_iterator
    streams.insert(0, body)  # FastChat's stream, closed with the worker streams it opened
    answered, opening = await unless_client_goes(connection, _opening(body))
    error = _event(opening[-1]) if answered and opening else {}
    if not answered or error.get("error_code"):
        for stream in reversed(streams):
            await stream.aclose()
        if not answered:
            return Response(status_code=CLIENT_GONE)
        if error["error_code"] == ErrorCode.ENGINE_OVERLOADED:
            return _overloaded(error["text"], error.get("retry_after_s") or 1)
        return create_error_response(error["error_code"], error["text"])
    return StreamWhileClientListens(_resumed(opening, body), streams, media_type=response.media_type)


def _event(chunk):
    """The JSON of a server-sent event ("data: {...}"), or {}."""
    try:
        event = json.loads(chunk.removeprefix("data: "))
    except ValueError:
        return {}
    return event if isinstance(event, dict) else {}


async def _opening(body):
    """A stream's chunks up to its first from a worker (a chat stream opens with the assistant's role)."""
    chunks = []
    async for chunk in body:
        chunks.append(chunk)
        choices = _event(chunk).get("choices") or [{}]
        if choices[0].get("delta") != {"role": "assistant"}:
            break
    return chunks


async def _resumed(opening, body):
    for chunk in opening:
        yield chunk
    async for chunk in body:
        yield chunk


def _overloaded(message, retry_after_s):
    return _error(message, status=429, code=ErrorCode.ENGINE_OVERLOADED, headers={"Retry-After": str(retry_after_s)})


def _checked_route(path, problem_of, prepare=lambda request: None):
    """Put a route that checks (then prepares) the request first in place of FastChat's route for path (the
    module's name for a FastChat endpoint may be another route's: it defines create_chat_completion twice)."""
    (route,) = remove_routes(app, path)
    request_type = route.endpoint.__annotations__["request"]

    async def checked(request: request_type, connection: Request):
        return await _answer(request, connection, problem_of, prepare, route.endpoint)

    app.post(path, dependencies=[Depends(fastchat_api.check_api_key)])(checked)


async def embeddings(request: EmbeddingsRequest, model_name: str = None):
    return _error("this server has no embeddings: RWKV-4 World is trained to continue text, not to place texts near "
                  "similar ones; use a sentence-embedding model for search or clustering", code=ErrorCode.INVALID_MODEL)


_health = {"until": 0.0, "answer": None}


async def health():
    """200 while every model the controller lists has a worker that can answer, else 503 with one line
    (as llama.cpp's server answers /health). Asks no API key; its answer is reused for HEALTH_CACHE_S."""
    if time.monotonic() >= _health["until"]:
        _health["answer"] = await _check_health()
        _health["until"] = time.monotonic() + HEALTH_CACHE_S
    return _health["answer"]


async def _check_health():
    controller = fastchat_api.app_settings.controller_address
    try:
        models = await fetch_remote(controller + "/list_models", None, "models")
        busy = []
        for model in models:
            try:
                await get_worker_address(model)
            except WorkersFull as error:  # busy, and answering
                busy.append(str(error))
    except NoWorker as error:
        return unavailable(str(error))
    except (httpx.HTTPError, ValueError, TypeError):
        return unavailable(_controller_silent())
    if not models:
        return unavailable("no worker has registered with the controller yet; start one (python -m helpers.serving.worker)")
    return {"status": "ok", "models": models, **({"note": "; ".join(busy)} if busy else {})}


async def malformed_body(request, exc):
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return _error("malformed request body: not valid JSON", code=ErrorCode.VALIDATION_TYPE_ERROR)
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "body"
    return _error(f"malformed request body: {where}: {first.get('msg')}", code=ErrorCode.VALIDATION_TYPE_ERROR)


async def no_key(request, exc):
    """FastChat's 401 has an empty message: say what to send."""
    if exc.status_code == 401:
        return _error("this server needs a valid API key: send the header Authorization: Bearer KEY "
                      "(openai.OpenAI(api_key=KEY))", status=401, code=ErrorCode.INVALID_AUTH_KEY)
    return await http_exception_handler(request, exc)


async def _worker_status(address):
    try:
        response = await _http["client"].post(address + "/worker_get_status", timeout=STATUS_TIMEOUT_S)
        return response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


async def get_worker_address(model_name):
    """The controller's choice of worker, checked first: healthy, with room in its queue. A worker that does
    not answer makes the controller drop the workers it cannot reach; a full or unhealthy one is passed over
    (the controller's next choice is another worker). NoWorker, or WorkersFull when all that answer are full."""
    controller = fastchat_api.app_settings.controller_address
    retry_after_s = []  # of each full worker
    for _ in range(WORKER_CHOICES):
        address = await fetch_remote(controller + "/get_worker_address", {"model": model_name}, "address")
        status = await _worker_status(address) if address else None
        if status is None:
            await fetch_remote(controller + "/refresh_all_workers")
        elif status.get("healthy") and status["room"] > 0:
            return address
        elif status.get("healthy"):
            retry_after_s.append(status["retry_after_s"])
    if retry_after_s:
        raise WorkersFull(model_name, min(retry_after_s))
    raise NoWorker(model_name)


def _error_event(text, code, retry_after_s=None):
    """A stream's last event: FastChat's fields, and OpenAI's "error" object, which the openai client raises."""
    event = {"text": text, "error_code": code, "error": {"message": text, "type": "server_error", "code": code}}
    return {**event, "retry_after_s": retry_after_s} if retry_after_s else event


async def generate_completion_stream(payload, worker_addr):
    """FastChat's stream from a worker, with the text so far in each chunk as FastChat's handlers expect (the
    worker sends only what is new), ending with an error event if the worker goes away mid-answer."""
    from_worker, text = closes_with_response(_worker_stream(payload, worker_addr)), ""
    try:
        async for content in from_worker:
            if content.get("error_code"):
                yield _error_event(content["text"], content["error_code"], content.get("retry_after_s"))
            else:
                text += content["text"]
                yield {**content, "text": text}
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
    """FastChat answers every error with 400: here the status its code names (429 for a full worker, 500 for a
    failure on the server's side)."""
    if code == ErrorCode.ENGINE_OVERLOADED:
        return _overloaded(message, 1)
    return _error(message, status=500 if code // 100 >= 500 else 400, code=code)


async def _worker_stream(payload, worker_addr):
    """A worker's stream of JSON chunks, each ended by b"\\0", as FastChat reads it, on this server's client."""
    async with _http["client"].stream("POST", worker_addr + "/worker_generate_stream", json=payload,
                                      timeout=fastchat_api.WORKER_API_TIMEOUT) as response:
        buffer = b""
        async for raw in response.aiter_raw():
            *chunks, buffer = (buffer + raw).split(b"\0")
            for chunk in chunks:
                if chunk:
                    yield json.loads(chunk)


fastchat_gen_params = fastchat_api.get_gen_params


def install():
    """This module's checks, routes and functions in FastChat's API server (its app and module); once."""
    if fastchat_api.fetch_remote is fetch_remote:
        return  # installed already
    _checked_route("/v1/completions", _completion_problem)
    _checked_route("/v1/chat/completions", _chat_problem, prepare=_world_turns)
    # FastChat's own API (no checks, a 500 for an unknown model) and its embeddings, which call the worker's
    # get_embeddings: this worker has none.
    remove_routes(app, "/api/v1/chat/completions", "/api/v1/token_check", "/v1/embeddings",
                  "/v1/engines/{model_name}/embeddings")
    for path in ("/v1/embeddings", "/v1/engines/{model_name}/embeddings"):
        app.post(path, dependencies=[Depends(fastchat_api.check_api_key)])(embeddings)
    app.get("/health")(health)
    app.exception_handler(RequestValidationError)(malformed_body)
    app.exception_handler(HTTPException)(no_key)
    app.add_event_handler("startup", _open_client)
    app.add_event_handler("shutdown", _close_client)
    for function in (create_error_response, get_gen_params, check_model, get_worker_address, generate_completion_stream,
                     fetch_remote):
        setattr(fastchat_api, function.__name__, function)


@one_line_errors
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--controller-address", default="http://127.0.0.1:21001")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (another than loopback needs keys)")
    parser.add_argument("--port", type=int, default=8000)
    settings.add_flags(parser, "api_keys")
    args = parser.parse_args(argv)
    warn_about_versions(["fschat"])
    keys = [key.strip() for key in (settings.from_flags(args).api_keys or "").split(",") if key.strip()]
    problem = no_keys_problem(args.host, keys, "--api-keys (or set RWKV_API_KEYS)")
    if problem:
        print(f"Error: {problem}", file=sys.__stderr__)  # not into FastChat's log, which prefixes every line
        sys.exit(2)
    fastchat_api.app_settings.controller_address = args.controller_address
    fastchat_api.app_settings.api_keys = keys or None
    install()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
