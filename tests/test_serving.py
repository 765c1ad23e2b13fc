"""The serving stack (helpers.serving) on free loopback ports: FastChat's controller, two RWKV workers
pinned to their own cores, and the OpenAI-compatible API server, on the offline checkpoint, driven with the
official `openai` client (and plain HTTP where a client could not send the request)."""
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from helpers.runtime import library
from helpers.runtime.prompt import chat_message
from helpers.runtime.batching import decode_step, read_prompt
from helpers.runtime.loading import load_model, load_tokenizer
from helpers.runtime.sampling import Sampling
from helpers.tools.load_test import soak
from helpers.serving.scheduler import Overloaded, Scheduler, SchedulerStopped
from helpers.measure.timing import batched_greedy
from helpers.serving.stack import Stack, core_groups, free_port
from helpers.serving.rwkv_worker import AnswerText
from helpers.serving.worker import parse_cpus
from helpers.runtime.cpu import _parse_proc_cpuinfo, cpu_info
from helpers.runtime.errors import UserError
from helpers.runtime.paths import REPO_ROOT
from test_cpu import topology_cpuinfo

MODEL = "rwkv-4-world-tiny"
PROMPTS = [f"Question: {topic}\n\nAnswer:" for topic in (
    "What is AI?", "Why is the sky blue?", "Name a prime number.", "How do trains work?", "What is a CPU?",
    "Who wrote Hamlet?", "What is RWKV?", "How far is the Moon?", "What is rain?", "Why do cats purr?",
    "What is INT4?", "How do I bake bread?", "What is Tibet?", "What is a dragon?", "What is memory?",
    "What is a server?")]
LONG_STREAM_PROMPT = "Once upon a time"  # greedy on the offline checkpoint: 4000 tokens without a stop
PENALTY_PROMPT = "Once upon a time"
SCHEMA_BUDGET_S = 60  # the property-based run over the OpenAPI schema sends no request after this


@pytest.fixture(scope="module")
def stack(tiny_source):
    # The random-weight checkpoint: its greedy chain never writes a blank line (a stop), which the long
    # streams below need; the model trained here writes one within a few lines.
    with Stack(workers=2, model=tiny_source.location) as stack:
        yield stack


@pytest.fixture(scope="module")
def client(stack):
    # The server asks for no key; the client needs one, any will do. No retries: each test sees each answer.
    return openai.OpenAI(base_url=stack.url + "/v1", api_key="EMPTY", max_retries=0, timeout=120)


def complete(client, prompt, max_tokens=24, **fields):
    """The first choice of a greedy completion."""
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, **fields).choices[0]


def test_models_lists_the_model(client):
    assert [card.id for card in client.models.list().data] == [MODEL]


def test_workers_are_pinned_to_their_own_cores(stack):
    cores = [os.sched_getaffinity(worker.popen.pid) for worker in stack.workers]
    assert all(cores) and not cores[0] & cores[1]
    for worker, pinned in zip(stack.workers, cores):  # a thread for each physical core of its own
        threads = requests.post(worker.url + "/worker_get_status", timeout=10).json()["threads"]
        assert threads == len(cpu_info().physical_cores_of(pinned))


def admitted(stack):
    """Requests each worker has taken so far."""
    return [requests.post(worker.url + "/worker_get_status", timeout=5).json()["requests_admitted"] for worker in stack.workers]


def test_concurrent_greedy_completions_equal_each_served_alone(stack, client):
    before = admitted(stack)
    alone = [complete(client, prompt).text for prompt in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda prompt: complete(client, prompt).text, PROMPTS))
    assert together == alone
    assert len(set(alone)) > 1 and all(alone)
    taken = [after - earlier for after, earlier in zip(admitted(stack), before)]
    assert sum(taken) == 2 * len(PROMPTS) and min(taken) > 0  # the controller spread them over both workers


def test_streamed_chat_is_the_answer_in_pieces(client):
    request = dict(model=MODEL, messages=[{"role": "user", "content": "Hello! Who are you?"}], max_tokens=20, temperature=0)
    whole = client.chat.completions.create(**request).choices[0]
    chunks = list(client.chat.completions.create(**request, stream=True))
    pieces = [chunk.choices[0].delta.content or "" for chunk in chunks]
    assert len([piece for piece in pieces if piece]) > 1
    assert "".join(pieces) == whole.message.content.replace("\ufffd", "") != ""
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason


def test_a_blank_line_in_a_chat_message_is_read_as_a_line_break(client):
    def answer(text):
        messages = [{"role": "user", "content": text}]
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0).choices[0].message.content

    assert answer("Hello!\n\n\nWho are you?") == answer("Hello!\nWho are you?") != answer("Hello! Who are you?")


def test_a_chat_message_keeps_no_blank_line():
    assert chat_message(" Hello!\r\n\r\nWho are you?\n \n\n\nBye. ") == "Hello!\nWho are you?\nBye."
    assert chat_message("one\ntwo") == "one\ntwo"


def test_a_stop_string_ends_the_text_before_it(client):
    full = complete(client, PROMPTS[0], max_tokens=40).text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    stopped = complete(client, PROMPTS[0], max_tokens=40, stop=[stop])
    assert stopped.text == full[:full.index(stop)]
    assert stopped.finish_reason == "stop"


def greedy_with_penalties(model, prompt_ids, steps, presence, frequency):
    """The reference: OpenAI's penalties written out, on the runtime's batched step for one sequence."""
    state, logits = read_prompt(model, torch.tensor([prompt_ids]))
    tokens = []
    for _ in range(steps):
        scores = logits.clone()
        for token in set(tokens):
            scores[token] -= presence + frequency * tokens.count(token)
        tokens.append(int(scores.argmax()))
        (logits,) = decode_step(model, tokens[-1:], [state])
    return tokens


@pytest.mark.parametrize("path, fields, expected", [
    ("completions", {"model": MODEL, "prompt": "  "}, "prompt is empty"),
    ("completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 0}, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 100_000}, "max_tokens must be between 1 and 4096"),
    ("completions", {"model": "gpt-4", "prompt": "Hi"}, "unknown model 'gpt-4'"),
    ("completions", {"model": MODEL, "prompt": [1, 2, 3]}, "send text, not token ids"),
    ("completions", {"model": MODEL, "prompt": "Hi", "frequency_penalty": 2.5}, "frequency_penalty must be between -2 and 2"),
    ("chat/completions", {"model": MODEL, "messages": []}, "no user message"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "tool", "content": "Hi"}]}, "unknown message role 'tool'"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": ""}], "stream": True}, "empty"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "presence_penalty": -3},
     "presence_penalty must be between -2 and 2"),
])
def test_bad_requests_get_a_400_with_one_line_in_the_client(client, path, fields, expected):
    create = client.completions.create if path == "completions" else client.chat.completions.create
    with pytest.raises(openai.BadRequestError) as raised:
        create(**fields)
    message = raised.value.body["message"]
    assert raised.value.status_code == 400 and expected in message and "\n" not in message


@pytest.mark.parametrize("path, body, expected", [
    ("completions", {"model": MODEL}, "malformed request body: prompt"),
    ("completions", '{"model": "' + MODEL + '", "prompt": ', "not valid JSON"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}, "every message needs its text"),
])
def test_bodies_no_client_sends_get_a_400_with_one_line(stack, path, body, expected):
    data = body if isinstance(body, str) else json.dumps(body)
    response = requests.post(f"{stack.url}/v1/{path}", data=data, headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 400
    message = response.json()["message"]
    assert expected in message and "\n" not in message


def worker_statuses(stack):
    return [requests.post(worker.url + "/worker_get_status", timeout=5).json() for worker in stack.workers]


def wait_until_idle(stack, timeout_s=5):
    deadline = time.monotonic() + timeout_s
    while any(status["running"] or status["waiting"] for status in worker_statuses(stack)):
        assert time.monotonic() < deadline, "a worker still decodes for a client that has gone"
        time.sleep(0.05)


def test_a_client_that_goes_stops_its_request_within_one_step(stack):
    # greedy on the offline checkpoint: 4000 tokens without a stop, seconds of decoding
    for streamed in (False, True):
        before = sum(status["cancelled"] for status in worker_statuses(stack))
        connection = http.client.HTTPConnection("127.0.0.1", stack.api_server.port, timeout=60)
        body = {"model": MODEL, "prompt": LONG_STREAM_PROMPT, "max_tokens": 4000, "temperature": 0, "stream": streamed}
        connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        deadline = time.monotonic() + 30
        while not any(status["running"] for status in worker_statuses(stack)):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        connection.close()  # the client goes while its request decodes
        wait_until_idle(stack)
        statuses = worker_statuses(stack)
        assert sum(status["cancelled"] for status in statuses) == before + 1  # stopped before its 4000th token
        # counted by the worker: steps that still decoded it after the API server's connection closed
        assert max(status["most_steps_after_cancel"] for status in statuses) <= 1


def test_a_field_sent_as_null_gets_its_default(stack):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": None, "n": None, "temperature": 0}
    answer = requests.post(stack.url + "/v1/completions", json=body, timeout=60).json()
    assert len(answer["choices"]) == 1 and answer["usage"]["completion_tokens"] == 16  # OpenAI's default max_tokens


def test_the_health_route_and_the_routes_that_are_gone(stack):
    assert requests.get(stack.url + "/health", timeout=10).json() == {"status": "ok", "models": [MODEL]}
    for path in ("/v1/embeddings", f"/v1/engines/{MODEL}/embeddings"):
        response = requests.post(stack.url + path, json={"model": MODEL, "input": "Hello"}, timeout=10)
        assert response.status_code == 400 and "no embeddings" in response.json()["message"]
    for path in ("/api/v1/chat/completions", "/api/v1/token_check"):  # FastChat's own API, with none of the checks
        assert requests.post(stack.url + path, json={"model": MODEL, "messages": []}, timeout=10).status_code == 404
    assert requests.post(stack.workers[0].url + "/worker_get_embeddings", json={"input": ["Hi"]}, timeout=10).status_code == 404


def test_a_worker_checks_a_request_sent_straight_to_it(stack):
    def generate(**params):
        return requests.post(stack.workers[0].url + "/worker_generate", json={"prompt": "Hi", **params}, timeout=60).json()

    assert generate(max_new_tokens=3, temperature=0)["usage"]["completion_tokens"] == 3
    for params, expected in (({"prompt": "word " * 3000, "max_new_tokens": 2000}, "more than the model's context of 4096"),
                             ({"max_new_tokens": 8, "presence_penalty": 5}, "presence_penalty must be between -2 and 2"),
                             ({"max_new_tokens": 8, "top_p": 1.5}, "top_p must be between 0 and 1"),
                             ({"prompt": "", "max_new_tokens": 8}, "the prompt is empty")):
        answer = generate(**params)
        assert answer["error_code"] == 40302 and expected in answer["text"] and "\n" not in answer["text"]


def test_a_worker_stream_sends_only_the_text_each_chunk_adds(stack, tiny_source, tiny_model):
    body = {"prompt": LONG_STREAM_PROMPT, "max_new_tokens": 200, "temperature": 0}
    with requests.post(stack.workers[0].url + "/worker_generate_stream", json=body, stream=True, timeout=60) as response:
        chunks = [json.loads(chunk) for chunk in response.iter_lines(delimiter=b"\0") if chunk]
    assert len(chunks) > 10 and chunks[-1]["finish_reason"] == "length"
    # the pieces add up to the greedy answer once (the runtime's own decoding is the reference): what is sent
    # grows with the answer, not with its square
    tokenizer = load_tokenizer(tiny_source)
    (greedy,), _ = batched_greedy(tiny_model, [torch.tensor([tokenizer(LONG_STREAM_PROMPT).input_ids])], 199)
    assert "".join(chunk["text"] for chunk in chunks) == tokenizer.decode(greedy) and len(chunks[-1]["text"]) < 100


@pytest.mark.library_independent
def test_a_long_prompt_being_tokenized_does_not_hold_up_running_streams(stack, tiny_source):
    # A prompt far past the context: the worker tokenizes all of it before it can refuse it. In its event loop,
    # every stream it runs would wait that long for its next chunk.
    huge = "Once upon a time, in a land far away. " * 50_000
    started = time.monotonic()
    load_tokenizer(tiny_source)(huge)
    tokenize_s = time.monotonic() - started
    assert tokenize_s > 0.3  # long enough to see in the gaps
    worker = stack.workers[1].url
    body = {"prompt": LONG_STREAM_PROMPT, "max_new_tokens": 4000, "temperature": 0}
    arrivals, window = [], []

    def send_huge_prompts():
        time.sleep(1.0)  # gaps before, for comparison
        window.append(time.monotonic())
        for _ in range(2):
            answer = requests.post(worker + "/worker_generate", json={"prompt": huge, "max_new_tokens": 8}, timeout=60).json()
            assert "more than the model's context" in answer["text"]
        window.append(time.monotonic())

    with ThreadPoolExecutor(1) as pool, requests.post(worker + "/worker_generate_stream", json=body, stream=True,
                                                      timeout=60) as response:
        sender = pool.submit(send_huge_prompts)
        for _ in response.iter_lines(delimiter=b"\0"):
            arrivals.append(time.monotonic())
            if sender.done():
                break
        sender.result()
    gaps = [(later - earlier, earlier) for earlier, later in zip(arrivals, arrivals[1:])]
    before = max(gap for gap, at in gaps if at < window[0])
    during = max(gap for gap, at in gaps if window[0] <= at <= window[1])
    assert during < before + tokenize_s / 2, (during, before, tokenize_s)


def one_line_or_success(response):
    """A response that is not a server error: a success, or a 4xx whose message is one line."""
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400 and response.status_code != 404:
        message = response.json().get("message") or response.json()["detail"]
        assert "\n" not in str(message), message


def inlined(schema, components):
    """The schema with every "$ref" to components replaced by what it names."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            return inlined(components[schema["$ref"].rsplit("/", 1)[-1]], components)
        return {key: inlined(value, components) for key, value in schema.items()}
    return [inlined(item, components) for item in schema] if isinstance(schema, list) else schema


@pytest.mark.library_independent
def test_no_request_the_servers_own_schema_allows_gets_a_server_error(stack):
    # Bodies drawn from the server's OpenAPI document (every route it exposes), half of them for the served
    # model so that they get past the model check; bounded in count and, by each request's time limit, in time.
    document = requests.get(stack.url + "/openapi.json", timeout=10).json()
    components = document.get("components", {}).get("schemas", {})
    operations = [(method.upper(), path, inlined(spec.get("requestBody", {}).get("content", {}).get(
        "application/json", {}).get("schema"), components)) for path, methods in document["paths"].items()
        for method, spec in methods.items()]
    assert {path for _, path, _ in operations} == {"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings",
                                                   "/v1/engines/{model_name}/embeddings", "/health"}

    budget_ends = time.monotonic() + SCHEMA_BUDGET_S

    @settings(max_examples=25, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def any_request(data):
        method, path, schema = data.draw(st.sampled_from(operations))
        path = path.replace("{model_name}", data.draw(st.sampled_from([MODEL, "gpt-4", "%20"])))
        body = data.draw(from_schema(schema)) if schema else None
        if isinstance(body, dict) and data.draw(st.booleans()):
            body["model"] = MODEL
        if time.monotonic() > budget_ends:
            return  # drawn as before (hypothesis replays examples), not sent: the run is bounded in time too
        one_line_or_success(requests.request(method, stack.url + path, json=body, timeout=120))

    any_request()


@pytest.mark.library_independent
def test_a_soak_loses_no_request(stack):
    result = soak(stack.url, MODEL, 120, clients=8, worker_rss_mb=lambda: 0.0)
    assert result.outcomes.get("lost", 0) == 0, result.lost
    assert result.outcomes["refused"] == 120 // 20 and result.outcomes["cancelled"] == 12  # every malformed one; 1 in 10
    assert result.outcomes["answered"] == 120 - 6 - 12


# This test kills both workers of the module's stack: the tests after it start their own processes.
def test_a_worker_killed_mid_stream_ends_its_stream_with_an_error_and_the_others_answer_then_none(stack, client):
    chunks = iter(client.completions.create(model=MODEL, prompt=LONG_STREAM_PROMPT, max_tokens=4000, temperature=0, stream=True))
    next(chunks)
    (busy,) = [worker for worker in stack.workers if requests.post(
        worker.url + "/worker_get_status", timeout=5).json()["queue_length"] > 0]
    busy.popen.send_signal(signal.SIGKILL)
    received = 0
    with pytest.raises(openai.APIError, match="the worker stopped mid-answer; send the request again"):
        for _ in chunks:  # the client raises the stream's error event
            received += 1
    assert received < 3999  # it ended early
    texts = [complete(client, prompt).text for prompt in PROMPTS[:4]]
    assert all(texts)
    assert stack.controller.running() and stack.api_server.running()
    (last,) = [worker for worker in stack.workers if worker.running()]
    last.popen.send_signal(signal.SIGKILL)
    last.popen.wait()
    with pytest.raises(openai.InternalServerError) as raised:
        complete(client, "Hi")
    assert raised.value.status_code == 503 and raised.value.body["message"].startswith(f"no worker serves {MODEL} now")


@pytest.mark.library_independent
def test_keys_are_asked_for_and_a_full_worker_answers_429_with_retry_after(tiny_source):
    with Stack(model=tiny_source.location, max_batch=1, max_queue=1, api_keys="sk-one,sk-two") as stack:
        for key in ("wrong", None):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            response = requests.get(stack.url + "/v1/models", headers=headers, timeout=10)
            assert response.status_code == 401 and "needs a valid API key" in response.json()["message"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=stack.url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert requests.get(stack.url + "/health", timeout=10).status_code == 200  # no key needed
        keyed = openai.OpenAI(base_url=stack.url + "/v1", api_key="sk-two", max_retries=0, timeout=120)
        request = dict(model=MODEL, prompt=LONG_STREAM_PROMPT, max_tokens=4000, temperature=0, stream=True)
        running = keyed.completions.create(**request)
        next(iter(running))  # decoding: the batch of one is full
        # a stream answers once its first token is there (or its refusal): this one waits in the queue
        waiting = ThreadPoolExecutor(1).submit(keyed.completions.create, **request)
        deadline = time.monotonic() + 30
        while worker_statuses(stack)[0]["waiting"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for stream in (True, False):
            with pytest.raises(openai.RateLimitError) as raised:
                keyed.completions.create(**{**request, "stream": stream, "max_tokens": 8})
            response = raised.value.response
            assert response.status_code == 429 and 1 <= int(response.headers["Retry-After"]) <= 60
            full = "every worker serving rwkv-4-world-tiny is full; retry later (Retry-After says when)"
            assert full == raised.value.body["message"]
        running.close()  # its place goes to the waiting one, whose stream then opens
        waiting.result(timeout=60).close()


@pytest.mark.parametrize("module, how, code", [
    ("helpers.serving.api_server", "--api-keys (or set RWKV_API_KEYS)", 2),
    ("helpers.serving", "API_KEYS=... to make serve (--api-keys, or RWKV_API_KEYS)", 1),  # make serve: before loading
])
def test_the_api_server_refuses_to_listen_for_other_hosts_without_keys(module, how, code):
    environment = {name: value for name, value in os.environ.items() if name != "RWKV_API_KEYS"}
    result = subprocess.run([sys.executable, "-m", module, "--host", "0.0.0.0", "--port", str(free_port())],
                            capture_output=True, text=True, timeout=60, env=environment)
    assert result.returncode == code and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "Error: refusing to listen on 0.0.0.0 without API keys: anyone who reaches it could use the model. "
        f"Pass {how}, or listen on 127.0.0.1."]


def test_a_worker_refuses_to_listen_on_every_network():
    result = subprocess.run([sys.executable, "-m", "helpers.serving.worker", "--host", "0.0.0.0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "name this host's address on a private network" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def reads_only_the_new_turn(client, model, worker_url, tokenizer):
    """Whether the third turn of a chat, its history sent back as the client got it, is read from the state
    the worker kept after the second answer: only the new question and the answer's last token (which the
    model wrote but did not read)."""
    def prompt_tokens_read():
        return requests.post(worker_url + "/worker_get_status", timeout=5).json()["prompt_tokens_read"]

    messages = [{"role": "user", "content": "Hello! Who are you?"}]
    for question in ["Where do you live?", "What do you eat?"]:
        answer = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
        messages += [{"role": "assistant", "content": answer.choices[0].message.content}, {"role": "user", "content": question}]
    before = prompt_tokens_read()
    client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    read = prompt_tokens_read() - before
    return read <= len(tokenizer(f"\n\nUser: {messages[-1]['content']}\n\nAI:").input_ids) + 1


@pytest.mark.library_independent
def test_make_serve_answers_with_penalties_then_ctrl_c_stops_all_three(trained_source):
    port = free_port()
    serve = subprocess.Popen([sys.executable, "-m", "helpers.serving", "--port", str(port), "--low-bit", "sym_int4_head8"],
                             stdout=subprocess.PIPE, text=True)
    try:
        lines = iter(serve.stdout.readline, "")
        assert next(line for line in lines if line.startswith("Serving ") or line.startswith("Error"))
        served = requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["data"][0]["id"]
        assert served == trained_source.name == "rwkv-4-world-shakespeare"  # make serve's default
        # OpenAI's penalties reach the worker: on the model trained here greedy text repeats itself, and the
        # penalized answer is the reference's (the random checkpoint's greedy chain never repeats a token)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY", max_retries=0, timeout=120)
        ask = lambda **penalties: client.completions.create(model=served, prompt=PENALTY_PROMPT, max_tokens=32,  # noqa: E731
                                                            temperature=0, **penalties).choices[0].text
        expected = greedy_with_penalties(load_model(trained_source, "sym_int4_head8"),  # make serve LOW_BIT=sym_int4_head8
                                         load_tokenizer(trained_source)(PENALTY_PROMPT).input_ids, 32, 0.5, 1.0)
        assert ask(presence_penalty=0.5, frequency_penalty=1.0) == load_tokenizer(trained_source).decode(expected) != ask()
        children = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(serve.pid)], capture_output=True, text=True).stdout.split()]
        assert len(children) == 3
        (worker,) = [pid for pid in children if "helpers.serving.worker" in open(f"/proc/{pid}/cmdline").read()]
        worker_flags = open(f"/proc/{worker}/cmdline").read().split("\0")
        assert worker_flags[worker_flags.index("--low-bit") + 1] == "sym_int4_head8"
        worker_url = f"http://127.0.0.1:{worker_flags[worker_flags.index('--port') + 1]}"
        # the model trained here begins its answers with spaces: a chat sent back whole still finds its state
        assert reads_only_the_new_turn(client, served, worker_url, load_tokenizer(trained_source))
        # a worker that dies is restarted, and make serve says so
        os.kill(worker, signal.SIGKILL)
        said = next(line for line in lines if line.startswith("worker-1"))
        assert said.strip() == "worker-1 stopped (exit code -9); restarting it in 1 s (restart 1)."
        assert next(lines).startswith("Restarted worker-1 (process ")
        deadline = time.monotonic() + 120
        while not requests.get(f"http://127.0.0.1:{port}/health", timeout=10).ok:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert ask(presence_penalty=0.5, frequency_penalty=1.0) == load_tokenizer(trained_source).decode(expected)
        children = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(serve.pid)], capture_output=True, text=True).stdout.split()]
        serve.send_signal(signal.SIGINT)
        assert serve.wait(30) == 0 and "Stopping." in serve.stdout.read()
        assert not any(os.path.exists(f"/proc/{pid}") for pid in children)
    finally:
        serve.kill()


@pytest.mark.library_independent
@pytest.mark.parametrize("keys", [["API_KEYS=sekrit"], []])  # as the README gives them: a make variable, RWKV_API_KEYS
def test_make_serve_takes_api_keys_both_ways_the_readme_gives(keys):
    port = free_port()
    environment = {**os.environ, **({} if keys else {"RWKV_API_KEYS": "sekrit", "API_KEYS": "not a JSON list"})}
    serve = subprocess.Popen(["make", "--no-print-directory", "serve", f"PORT={port}", f"LIBRARY={library.name()}", *keys],
                             cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment,
                             start_new_session=True)
    try:
        said = next((line for line in iter(serve.stdout.readline, "") if line.startswith(("Serving ", "Error"))), "")
        assert said.startswith("Serving "), said
        models = f"http://127.0.0.1:{port}/v1/models"
        assert requests.get(models, timeout=10).status_code == 401
        assert requests.get(models, headers={"Authorization": "Bearer sekrit"}, timeout=10).json()["data"]
    finally:
        os.killpg(serve.pid, signal.SIGINT)
        serve.wait(30)


@pytest.mark.library_independent
def test_a_bad_model_path_stops_make_serve_with_one_line():
    result = subprocess.run([sys.executable, "-m", "helpers.serving", "--port", str(free_port()), "--model", "/no/such/model"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "No model folder at /no/such/model" in result.stderr and "Traceback" not in result.stderr


def test_requests_submitted_together_share_decoding_steps(tiny_source):
    model = load_model(tiny_source)
    prompts = [[1 + i, 20 + 7 * i, 300 + i][:1 + i % 3] for i in range(4)]
    alone = [batched_greedy(model, [torch.tensor([ids])], 15)[0][0] for ids in prompts]
    scheduler = Scheduler(model, max_batch=4)
    submitted = [scheduler.submit(ids, max_new_tokens=16) for ids in prompts]
    served = [list(iter(request.tokens.get, None)) for request in submitted]
    scheduler.close()
    assert served == alone
    assert scheduler.steps < 2 * 15  # together: 15 steps for all four (alone: 60)
    scheduler.thread.join(timeout=10)
    assert not scheduler.thread.is_alive()  # closed: the model thread has ended


def arrived(request, timeout_s=30):
    """Everything the scheduler sends the request until None or an exception."""
    items = []
    while not items or isinstance(items[-1], int):
        items.append(request.tokens.get(timeout=timeout_s))
    return items


@pytest.fixture(scope="module")
def tiny_model(tiny_source):
    return load_model(tiny_source)


def test_a_full_queue_refuses_at_once_and_a_long_wait_is_refused(tiny_model):
    scheduler = Scheduler(tiny_model, max_batch=1, max_queue=1, queue_timeout_s=0.5)
    running = scheduler.submit([1, 2, 3], max_new_tokens=4000)
    running.tokens.get(timeout=30)  # admitted: the batch of one is full
    waiting = scheduler.submit([4, 5], max_new_tokens=4)
    with pytest.raises(Overloaded, match="1 requests running and 1 waiting") as raised:
        scheduler.submit([6], max_new_tokens=4)
    assert 1 <= raised.value.retry_after_s <= 60
    assert isinstance(arrived(waiting)[-1], Overloaded)  # no place within 0.5 s: refused, not left waiting
    scheduler.cancel(running)
    assert arrived(running)[-1] is None
    scheduler.close()


def test_a_cancelled_request_stops_before_the_next_step(tiny_model):
    scheduler = Scheduler(tiny_model, max_batch=2)
    other = scheduler.submit([7, 8], max_new_tokens=60)
    request = scheduler.submit([1, 2, 3], max_new_tokens=4000)
    for _ in range(5):
        request.tokens.get(timeout=30)
    scheduler.cancel(request)
    after = arrived(request)
    status = scheduler.status()
    # counted by the scheduler: steps that still decoded it after cancel(), at most the one then running
    assert after[-1] is None and 5 + len(after) - 1 < 4000
    assert status["cancelled"] == 1 and status["most_steps_after_cancel"] <= 1
    rest = arrived(other)
    assert rest[-1] is None and len(rest) == 61  # its 60 tokens: the other request went on
    scheduler.close()


def test_a_dead_model_thread_fails_every_request_at_once(tiny_model):
    scheduler = Scheduler(tiny_model, max_batch=2)

    def broken():
        raise RuntimeError("a bug in the loop")

    scheduler._retire = broken
    first, second = scheduler.submit([1, 2], max_new_tokens=50), scheduler.submit([3], max_new_tokens=50)
    for request in (first, second):
        last = arrived(request, timeout_s=10)[-1]
        assert isinstance(last, SchedulerStopped) and "a bug in the loop" in str(last)
    scheduler.thread.join(timeout=10)
    assert scheduler.status()["healthy"] is False and not scheduler.thread.is_alive()
    with pytest.raises(SchedulerStopped, match="restart the worker"):
        scheduler.submit([4], max_new_tokens=5)


def test_a_worker_whose_model_thread_died_answers_with_an_error_and_reports_itself_unhealthy(tiny_source):
    from fastapi.testclient import TestClient
    from fastchat.serve import base_model_worker

    from helpers.serving.api_server import create_error_response
    from helpers.serving.rwkv_worker import RwkvWorker, install_routes

    worker = RwkvWorker(tiny_source, MODEL, "sym_int4", 2, controller_addr="http://127.0.0.1:9",
                        worker_addr="http://127.0.0.1:9")
    install_routes(base_model_worker.app, worker)
    with TestClient(base_model_worker.app) as http:
        assert http.get("/health").json() == {"status": "ok"}
        assert http.post("/worker_generate", json={"prompt": "Hi", "max_new_tokens": 2}).json()["error_code"] == 0

        def broken():
            raise RuntimeError("a bug in the loop")

        worker.scheduler._retire = broken
        answer = http.post("/worker_generate", json={"prompt": "Hi", "max_new_tokens": 5}).json()
        assert answer["error_code"] == 50001 and "a bug in the loop" in answer["text"] and "\n" not in answer["text"]
        health = http.get("/health")
        assert health.status_code == 503 and "model thread stopped" in health.json()["error"]["message"]
        assert http.post("/worker_get_status").json()["healthy"] is False
    response = create_error_response(answer["error_code"], answer["text"])  # what the API server answers
    assert response.status_code == 500 and json.loads(response.body)["message"] == answer["text"]
    assert create_error_response(42903, "full").headers["Retry-After"] == "1"


def test_greedy_and_sampled_picks():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0])
    assert Sampling().pick(logits) == 1
    assert {Sampling(temperature=1.0, top_k=2).pick(logits) for _ in range(200)} == {1, 3}
    assert {Sampling(temperature=1.0, top_p=0.01).pick(logits) for _ in range(50)} == {1}


def test_penalties_by_hand():
    logits, counts = torch.tensor([0.0, 3.0, 1.0, 2.0]), {1: 2, 2: 1}
    penalties = Sampling(presence_penalty=0.5, frequency_penalty=0.75)
    # token 1: 3 - 0.5 - 2 x 0.75 = 1.0; token 2: 1 - 0.5 - 0.75 = -0.25; token 3 untouched and now the best
    assert penalties.penalized(logits, counts).tolist() == [0.0, 1.0, -0.25, 2.0]
    assert penalties.pick(logits, counts) == 3 and Sampling().pick(logits, counts) == 1
    fading, seen = Sampling(penalty_decay=0.5), {}
    for token in (7, 7, 9):
        fading.count(seen, token)
    assert seen == {7: (1 * 0.5 + 1) * 0.5, 9: 1}
    sampled = Sampling(temperature=1.0, top_p=0.7).probabilities(logits)
    full = torch.softmax(logits, -1)
    assert torch.allclose(sampled, torch.tensor([0.0, full[1], 0.0, full[3]]) / (full[1] + full[3]))


def test_answer_text_holds_back_a_possible_stop_and_cuts_at_a_stop():
    pieces = {1: b"Answer", 2: b": yes", 3: b"\n", 4: b"\nUser", 5: b"\xe2", 6: b"\x82", 7: b"\xac"}
    answer = AnswerText(pieces, ["\n\n"], {0})
    for token in (1, 2, 3):
        answer.add(token)
    assert (answer.text, answer.visible, answer.finish) == ("Answer: yes\n", "Answer: yes", None)
    answer.add(4)
    assert (answer.text, answer.finish, answer.tokens) == ("Answer: yes", "stop", [1, 2, 3, 4])
    euro = AnswerText(pieces, [], {0})
    for token in (5, 6):
        euro.add(token)
        assert euro.text == ""  # a character split over three tokens waits for all of them
    euro.add(7)
    euro.add(0)
    assert (euro.text, euro.finish, euro.tokens) == ("\u20ac", "stop", [5, 6, 7])
    cut = AnswerText(pieces, [], {0})
    cut.add(5)
    cut.end("length")  # max_tokens reached inside a character
    assert (cut.text, cut.finish) == ("\ufffd", "length")


def test_core_lists():
    assert parse_cpus(",".join(map(str, sorted(os.sched_getaffinity(0))))) == os.sched_getaffinity(0)
    no_smt = _parse_proc_cpuinfo(topology_cpuinfo(sockets=1, cores=8, threads=1))
    assert core_groups(2, range(8), no_smt) == ["0-3", "4-7"]
    assert core_groups(2, [0, 2, 4, 6], no_smt) == ["0,2", "4,6"]
    with pytest.raises(UserError, match="core numbers"):
        parse_cpus("first")
    with pytest.raises(UserError, match="between 1 and the 8 physical cores"):
        core_groups(9, range(8), no_smt)


def test_workers_get_whole_physical_cores_where_siblings_are_numbered_apart():
    # 2 sockets of 4 cores, CPU n and n + 8 the two threads of one core: contiguous halves of 0-15 would give
    # each worker both threads of cores the other worker also runs on.
    server = _parse_proc_cpuinfo(topology_cpuinfo(sockets=2, cores=4))
    assert core_groups(2, range(16), server) == ["0-3,8-11", "4-7,12-15"]  # a socket each
    assert core_groups(4, range(16), server) == ["0-1,8-9", "2-3,10-11", "4-5,12-13", "6-7,14-15"]
    with pytest.raises(UserError, match="between 1 and the 8 physical cores"):
        core_groups(16, range(16), server)


@pytest.mark.parametrize("messages, stop, expected", [
    ("Once upon a time", None, []),  # a completion continues past blank lines
    ("Once upon a time", "THE END", ["THE END"]),
    ([{"role": "user", "content": "Hi"}], None, ["\n\n"]),  # a chat turn ends at one
])
def test_only_chats_stop_at_the_templates_blank_line(monkeypatch, messages, stop, expected):
    import asyncio

    from helpers.serving import api_server  # first: it keeps FastChat from logging into the current folder
    from fastchat.conversation import SeparatorStyle
    from fastchat.serve import openai_api_server as fastchat_api

    template = {"name": "rwkv-world", "system_template": "{system_message}", "system_message": "",
                "roles": ["User", "AI"], "messages": [], "offset": 0,
                "sep_style": SeparatorStyle.FALCON_CHAT.value, "sep": "\n\n",
                "sep2": None, "stop_str": "\n\n", "stop_token_ids": [0]}

    async def get_conv(model_name, worker_addr):
        return template

    monkeypatch.setattr(fastchat_api, "get_conv", get_conv)
    params = asyncio.run(api_server.get_gen_params("m", "w", messages, temperature=0, top_p=1, top_k=None,
                                                   presence_penalty=0, frequency_penalty=0, max_tokens=8,
                                                   echo=False, stop=stop))
    assert sorted(params["stop"]) == expected and params["stop_token_ids"] == [0]
