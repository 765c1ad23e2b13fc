"""A FastChat model worker for RWKV-4 in low bits on the CPU.

    python -m helpers.serving.worker --controller-address http://127.0.0.1:21001 --port 21002 [--model PATH_OR_ID]
        [--cpus 0-7] [--host 0.0.0.0 --worker-address http://THIS_HOST:21002]

It loads the model as the notebooks do (helpers.runtime: the low-bit cache, the CPU repair, the fused
decoding step), batches the requests it is sent (helpers.serving.scheduler), streams text with stop
strings, and registers with the controller once it can answer. `--cpus` pins it to those cores (one
worker per socket or NUMA node on a server).
"""
import argparse
import asyncio
import json
import os
import queue
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import requests

from helpers.runtime.errors import UserError

MAX_CHAR_TOKENS = 4  # a UTF-8 character has at most 4 bytes, so it is split over at most 4 tokens
# A request waiting for a place in the batch sends its unchanged text this often, so that the API server's
# read timeout (FastChat's WORKER_API_TIMEOUT, 100 s) does not take it for a dead worker.
KEEPALIVE_S = 10


def parse_cpus(text):
    """{0, 1, 2, 3, 8} from "0-3,8", as taskset -c writes core lists."""
    try:
        cpus = set()
        for part in text.split(","):
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise UserError(f"--cpus takes core numbers such as 0-7 or 0,2,4, not {text!r}.") from None
    unknown = cpus - os.sched_getaffinity(0)
    if unknown or not cpus:
        raise UserError(f"--cpus {text}: this machine lets the worker use cores {sorted(os.sched_getaffinity(0))} only.")
    return cpus


def _error_chunk(text, code):
    return json.dumps({"text": text, "error_code": int(code)}).encode() + b"\0"


class AnswerText:
    """An answer's text as its tokens arrive: whole characters only, ended by a stop token or cut before
    the first stop string (finish is then "stop")."""

    def __init__(self, decode, stops, stop_ids):
        self.decode, self.stops, self.stop_ids = decode, stops, stop_ids
        self.longest_stop = max(map(len, stops), default=0)
        self.tokens, self.pending, self.text, self.finish = [], [], "", None

    def add(self, token):
        if token in self.stop_ids:
            self.finish = "stop"
            return
        self.tokens.append(token)
        self.pending.append(token)
        piece = self.decode(self.pending)
        if piece.endswith("\ufffd") and len(self.pending) < MAX_CHAR_TOKENS:
            return  # a split UTF-8 character waits for its next bytes
        searched, self.pending = max(0, len(self.text) - self.longest_stop), []
        self.text += piece
        ends = [end for end in (self.text.find(stop, searched) for stop in self.stops) if end >= 0]
        if ends:
            self.text, self.finish = self.text[:min(ends)], "stop"

    @property
    def visible(self):
        """What can be sent now: a tail that may become a stop string is held back."""
        for length in range(min(len(self.text), self.longest_stop), 0, -1):
            if any(stop.startswith(self.text[-length:]) for stop in self.stops):
                return self.text[:-length]
        return self.text


def _arrived(request):
    """The tokens the scheduler has sent the request: waits for one (KEEPALIVE_S at most, then returns
    none), takes the others already there."""
    try:
        tokens = [request.tokens.get(timeout=KEEPALIVE_S)]
    except queue.Empty:
        return []
    while True:
        try:
            tokens.append(request.tokens.get_nowait())
        except queue.Empty:
            return tokens


def _register_when_listening(worker, host, port):
    """Register with the controller once this worker's server accepts connections (the controller drops
    a worker it cannot reach), retrying until the controller answers; then send heartbeats."""
    address = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    while True:
        try:
            socket.create_connection((address, port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    while True:
        try:
            return worker.init_heart_beat()
        except requests.RequestException as error:
            print(f"The controller at {worker.controller_addr} does not answer ({error}); retrying in 5 s")
            time.sleep(5)


def _make_worker_class():
    """The worker class (FastChat, torch and bigdl-llm are imported only once --cpus has pinned the process)."""
    from fastchat.constants import ErrorCode
    from fastchat.conversation import Conversation, SeparatorStyle
    from fastchat.serve.base_model_worker import BaseModelWorker

    from helpers.runtime.loading import load_model, load_tokenizer
    from helpers.runtime.sampling import Sampling
    from helpers.serving.scheduler import Scheduler

    # The World chat format, "System\n\nUser: ...\n\nAssistant:" (the system part only when one is sent),
    # is what FastChat's FALCON_CHAT style writes with these roles and separator.
    world_chat = Conversation(
        name="rwkv-world", roles=("User", "Assistant"), sep_style=SeparatorStyle.FALCON_CHAT, sep="\n\n",
        stop_str="\n\n", stop_token_ids=[0],
    )

    class RwkvWorker(BaseModelWorker):
        def __init__(self, source, model_name, low_bit, max_batch, **addresses):
            super().__init__(model_path=source.location, model_names=[model_name], conv_template=None,
                             limit_worker_concurrency=2 * max_batch, worker_id=uuid.uuid4().hex[:8], **addresses)
            self.tokenizer = load_tokenizer(source)
            self.model = load_model(source, low_bit, report=print)
            self.context_len = self.model.config.context_length
            self.scheduler = Scheduler(self.model, max_batch)

        def make_conv_template(self, conv_template=None, model_path=None):
            return world_chat.copy()

        def get_status(self):
            """FastChat's status (what the controller reads), and how many requests this worker has taken."""
            return {**super().get_status(), "requests_admitted": self.scheduler.admitted}

        def generate_stream_gate(self, params):
            """FastChat's stream: the text so far as JSON chunks ending in b"\\0", the last with finish_reason."""
            try:
                yield from self._generate_stream(params)
            except UserError as error:
                yield _error_chunk(f"Bad request: {error}", ErrorCode.PARAM_OUT_OF_RANGE)
            except Exception as error:
                yield _error_chunk(f"The model failed on this request: {error}", ErrorCode.INTERNAL_ERROR)

        def generate_gate(self, params):
            for chunk in self.generate_stream_gate(params):
                pass
            return json.loads(chunk[:-1])

        def _read_params(self, params):
            """(prompt, max_new_tokens, stop strings, stop token ids, Sampling) from FastChat's request."""
            prompt = params.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                raise UserError("the prompt is empty; send some text")
            try:
                max_new_tokens = int(params.get("max_new_tokens", 256))
                stops = params.get("stop") or []
                stops = [stops] if isinstance(stops, str) else [str(stop) for stop in stops if stop]
                stop_ids = {int(token) for token in params.get("stop_token_ids") or []} | {0}  # 0: end of text
                sampling = Sampling(float(params.get("temperature", 1.0)), float(params.get("top_p", 1.0)),
                                    int(params.get("top_k") or -1), float(params.get("presence_penalty") or 0.0),
                                    float(params.get("frequency_penalty") or 0.0))
            except (TypeError, ValueError) as error:
                raise UserError(f"a parameter has the wrong type ({error})") from None
            if not 1 <= max_new_tokens <= self.context_len:
                raise UserError(f"max_tokens must be between 1 and {self.context_len}, not {max_new_tokens}")
            for name in ("presence_penalty", "frequency_penalty"):
                if not -2.0 <= getattr(sampling, name) <= 2.0:
                    raise UserError(f"{name} must be between -2 and 2, as in OpenAI's API, not {getattr(sampling, name)}")
            return prompt, max_new_tokens, stops, stop_ids, sampling

        def _generate_stream(self, params):
            prompt, max_new_tokens, stops, stop_ids, sampling = self._read_params(params)
            prompt_ids = self.tokenizer(prompt).input_ids
            request = self.scheduler.submit(prompt_ids, max_new_tokens, sampling)
            echo = prompt if params.get("echo") else ""
            answer = AnswerText(lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True), stops, stop_ids)
            try:
                while answer.finish is None:
                    for token in _arrived(request):  # several when this reader fell behind: one chunk for all
                        if isinstance(token, Exception):
                            raise token
                        if token is None:
                            answer.finish = "length"
                        else:
                            answer.add(token)
                        if answer.finish:
                            break
                    else:
                        yield self._chunk(echo + answer.visible, prompt_ids, answer.tokens)
            finally:
                request.cancel()
            yield self._chunk(echo + answer.text, prompt_ids, answer.tokens, answer.finish)

        def _chunk(self, text, prompt_ids, generated, finish=None):
            usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(generated),
                     "total_tokens": len(prompt_ids) + len(generated)}
            return json.dumps({"text": text, "error_code": 0, "usage": usage, "finish_reason": finish}).encode() + b"\0"

    return RwkvWorker


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--controller-address", default="http://127.0.0.1:21001")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to take requests from other hosts")
    parser.add_argument("--port", type=int, default=21002)
    parser.add_argument("--worker-address", help="how the controller reaches this worker (default: http://HOST:PORT)")
    parser.add_argument("--model", help="model folder or hub id (default: RWKV_MODEL, else the model trained here)")
    parser.add_argument("--model-name", help="the name clients ask for (default: the model folder's name)")
    parser.add_argument("--low-bit", default="sym_int4")
    parser.add_argument("--max-batch", type=int, default=16, help="requests decoded together at most")
    parser.add_argument("--cpus", help="cores to run on, as taskset -c takes them (0-7)")
    args = parser.parse_args(argv)
    os.environ.setdefault("LOGDIR", "")  # FastChat logs to stdout only, not into files in the current folder
    try:
        if args.cpus:
            os.sched_setaffinity(0, parse_cpus(args.cpus))  # before torch starts its threads
        import torch  # helpers, imported with this module, has chosen bigdl-llm's native library already
        import uvicorn
        from fastchat.serve import base_model_worker

        from helpers.models import resolve_model

        torch.set_num_threads(len(os.sched_getaffinity(0)))
        source = resolve_model(args.model)
        worker = _make_worker_class()(
            source, args.model_name or source.name.split("--")[-1], args.low_bit, args.max_batch,
            controller_addr=args.controller_address, worker_addr=args.worker_address or f"http://{args.host}:{args.port}")
    except UserError as error:
        sys.exit(f"Error: {error}")
    threading.Thread(target=_register_when_listening, args=(worker, args.host, args.port), daemon=True).start()
    # FastChat runs each non-streamed request in the event loop's default thread pool, min(32, cores + 4)
    # threads: on a small machine fewer requests than the batch holds. One thread per request it admits:
    base_model_worker.app.router.on_startup.append(lambda: asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(worker.limit_worker_concurrency)))
    uvicorn.run(base_model_worker.app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
