"""The FastChat model worker itself: RwkvWorker answers FastChat's generate calls through the scheduler, and
install_routes puts its routes on FastChat's app. helpers.serving.worker imports it once --cpus has pinned the
process and start() has chosen bigdl-llm's native library (torch, FastChat and bigdl-llm load here).
"""
import asyncio
import json
import uuid

from helpers.runtime import settings

settings.keep_fastchat_logs_on_stdout()  # before fastchat is imported

import torch  # noqa: E402
from fastapi import Request, Response  # noqa: E402
from fastchat.constants import ErrorCode  # noqa: E402
from fastchat.conversation import Conversation, SeparatorStyle  # noqa: E402
from fastchat.serve.base_model_worker import BaseModelWorker  # noqa: E402

from helpers.runtime.errors import UserError  # noqa: E402
from helpers.runtime.loading import load_model, load_tokenizer  # noqa: E402
from helpers.runtime.sampling import Sampling  # noqa: E402
from helpers.runtime.whole_characters import WholeCharacters, token_bytes  # noqa: E402
from helpers.serving.http import CLIENT_GONE, StreamWhileClientListens, remove_routes, unavailable, unless_client_goes  # noqa: E402
from helpers.serving.limits import max_tokens_problem, sampling_problem  # noqa: E402
from helpers.serving.scheduler import QUEUE_TIMEOUT_S, Overloaded, Scheduler, SchedulerStopped  # noqa: E402
from helpers.serving.state_cache import STATE_CACHE_MB  # noqa: E402

UNHEALTHY_QUEUE = 10**9  # the queue length a worker whose model thread failed reports to the controller
# A request waiting for a place in the batch, or for prompts read ahead of it, sends its unchanged text this
# often, so that the API server's read timeout (FastChat's WORKER_API_TIMEOUT, 100 s) does not take the
# worker for dead (FastChat's API server sends no event for it).
KEEPALIVE_S = 10
TURN_END = "\n\n"  # the World chat format's separator: a state after it is where a next turn can begin


def turn_boundaries(tokens):
    """The prompt lengths after each token that ends a chat turn, from the tokenizer's token strings (or bytes)."""
    return [index + 1 for index, token in enumerate(tokens)
            if token.endswith(TURN_END.encode() if isinstance(token, bytes) else TURN_END)]


def _one_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _error_chunk(text, code, **fields):
    return json.dumps({"text": text, "error_code": int(code), **fields}).encode() + b"\0"


class AnswerText:
    """An answer's text as its tokens arrive: whole characters only, ended by a stop token or cut before
    the first stop string (finish is then "stop"), or ended by the caller (end)."""

    def __init__(self, token_bytes, stops, stop_ids):
        self.characters, self.stops, self.stop_ids = WholeCharacters(token_bytes), stops, stop_ids
        self.longest_stop = max(map(len, stops), default=0)
        self.tokens, self.text, self.finish = [], "", None

    def add(self, token):
        if token in self.stop_ids:
            self.end("stop")
            return
        self.tokens.append(token)
        self._extend(self.characters.add(token))  # "" while a split UTF-8 character waits for its next bytes

    def end(self, finish):
        """The answer ends here: a character whose bytes did not all come shows as U+FFFD, as in
        tokenizer.decode() of the tokens."""
        if self.finish is None:
            self._extend(self.characters.end())
        self.finish = self.finish or finish

    def _extend(self, piece):
        searched = max(0, len(self.text) - self.longest_stop)
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


class Tokens:
    """A request's tokens for a reader in the event loop: the scheduler's thread puts them, the reader
    awaits them."""

    def __init__(self):
        self.loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()

    def put(self, item):
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed: the worker is stopping, no one reads
            pass

    async def arrived(self):
        """The tokens put since the last call: waits for one (KEEPALIVE_S at most, then returns none), takes
        the others already there."""
        try:
            tokens = [await asyncio.wait_for(self.queue.get(), KEEPALIVE_S)]
        except asyncio.TimeoutError:
            return []
        while not self.queue.empty():
            tokens.append(self.queue.get_nowait())
        return tokens


# The World chat format, "System\n\nUser: ...\n\nAI:" (the system part only when one is sent; User and AI
# are a pair BlinkDL's RWKV-4 World card names for chat), is what FastChat's FALCON_CHAT style writes with
# these roles and separator.
world_chat = Conversation(
    name="rwkv-world", roles=("User", "AI"), sep_style=SeparatorStyle.FALCON_CHAT, sep="\n\n",
    stop_str="\n\n", stop_token_ids=[0],
)


class RwkvWorker(BaseModelWorker):
    def __init__(self, source, model_name, low_bit, max_batch, max_queue=None, queue_timeout_s=QUEUE_TIMEOUT_S,
                 state_cache_mb=STATE_CACHE_MB, **addresses):
        super().__init__(model_path=source.location, model_names=[model_name], conv_template=None,
                         limit_worker_concurrency=max_batch, worker_id=uuid.uuid4().hex[:8], **addresses)
        self.tokenizer = load_tokenizer(source)
        self.token_bytes = token_bytes(self.tokenizer)
        self.model = load_model(source, low_bit, report=print)
        self.context_len = self.model.config.context_length
        self.scheduler = Scheduler(self.model, max_batch, max_queue, queue_timeout_s, state_cache_mb, self._text_of)

    def _text_of(self, ids):
        """The UTF-8 bytes token ids stand for; None where one stands for none (the end of text)."""
        try:
            return b"".join(self.token_bytes[token] for token in ids)
        except KeyError:
            return None

    def _token_ids(self, prompt):
        """The prompt's token ids: those of the longest text the state cache holds that it begins with (a chat's
        history, as the model read and wrote it), then the rest's."""
        data = prompt.encode()
        known, length = self.scheduler.cache.longest_text(data) if self.scheduler.cache else ([], 0)
        return known + self.tokenizer(data[length:].decode()).input_ids

    def make_conv_template(self, conv_template=None, model_path=None):
        return world_chat.copy()

    def get_queue_length(self):
        """What the controller's heartbeats carry, to send new requests to the shortest queue: endless once
        the model thread has failed, so that requests go to the other workers."""
        status = self.scheduler.status()
        return status["running"] + status["waiting"] if status["healthy"] else UNHEALTHY_QUEUE

    def get_status(self):
        """FastChat's status (what the controller reads) and the scheduler's: health, room, counts; and the
        threads the model runs on."""
        return {**super().get_status(), **self.scheduler.status(), "threads": torch.get_num_threads()}

    def count_token(self, params):
        """FastChat's token count (the API server's length check asks it); 0 for a prompt that is not
        text, which the request itself is then refused for with one line."""
        try:
            return super().count_token(params)
        except (ValueError, KeyError, TypeError):  # UnicodeError is a ValueError
            return {"count": 0, "error_code": 0}

    def _read_params(self, params):
        """(prompt, its token ids, its turn boundaries, max_new_tokens, stop strings, stop token ids, Sampling)
        from FastChat's request; UserError for a value out of range or a prompt that leaves no room for
        max_tokens. It tokenizes the prompt: call it in a thread of its own, not in the event loop."""
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
        except (TypeError, ValueError, OverflowError) as error:
            raise UserError(f"a parameter has the wrong type ({error})") from None
        problem = max_tokens_problem(max_new_tokens, self.context_len) or sampling_problem(
            temperature=sampling.temperature, top_p=sampling.top_p, presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty)
        if problem:
            raise UserError(problem)
        try:
            prompt_ids = self._token_ids(prompt)
        except UnicodeError:
            raise UserError("the prompt is not valid Unicode text") from None
        except ValueError as error:  # a byte the vocabulary has no token for
            raise UserError(str(error)) from None
        if len(prompt_ids) + max_new_tokens > self.context_len:
            raise UserError(f"the prompt's {len(prompt_ids)} tokens and max_tokens {max_new_tokens} are more than the "
                            f"model's context of {self.context_len} tokens; shorten the prompt or lower max_tokens")
        boundaries = turn_boundaries(self.tokenizer.convert_ids_to_tokens(prompt_ids))
        return prompt, prompt_ids, boundaries, max_new_tokens, stops, stop_ids, sampling

    async def stream(self, params):
        """FastChat's stream of JSON chunks ending in b"\\0", the last with finish_reason or an error_code, but
        each with only the text added since the one before (FastChat's worker sends the whole text again each
        time, bytes that grow with the square of the answer; helpers.serving.api_server joins the pieces).
        Cancelled (its client gone), it cancels its request before the next step."""
        try:  # tokenized in a thread, so that a long prompt does not hold up the other streams
            prompt, prompt_ids, boundaries, max_new_tokens, stops, stop_ids, sampling = await asyncio.to_thread(
                self._read_params, params)
            tokens = Tokens()
            request = self.scheduler.submit(prompt_ids, max_new_tokens, sampling, tokens, boundaries)
        except UserError as error:
            yield _error_chunk(f"Bad request: {error}", ErrorCode.PARAM_OUT_OF_RANGE)
            return
        except Overloaded as error:
            yield _error_chunk(str(error), ErrorCode.ENGINE_OVERLOADED, retry_after_s=error.retry_after_s)
            return
        except SchedulerStopped as error:
            yield _error_chunk(f"The worker cannot answer: {error}", ErrorCode.INTERNAL_ERROR)
            return
        echo = prompt if params.get("echo") else ""
        answer = AnswerText(self.token_bytes, stops, stop_ids)
        sent = 0  # characters of echo + text sent so far

        def new(text):
            nonlocal sent
            text, sent = text[sent:], len(text)
            return text

        try:  # a cancelled reader (its client gone) gets CancelledError or GeneratorExit at a yield or await
            while answer.finish is None:
                for token in await tokens.arrived():  # several when this reader fell behind: one chunk for all
                    if isinstance(token, Overloaded):
                        yield _error_chunk(str(token), ErrorCode.ENGINE_OVERLOADED, retry_after_s=token.retry_after_s)
                        return
                    if isinstance(token, Exception):
                        yield _error_chunk(f"The model failed on this request: {_one_line(token)}; send it again",
                                           ErrorCode.INTERNAL_ERROR)
                        return
                    if token is None:
                        answer.end("length")
                    else:
                        answer.add(token)
                    if answer.finish:
                        break
                else:
                    yield self._chunk(new(echo + answer.visible), prompt_ids, answer.tokens)
        except Exception as error:  # in the text of this answer: this request's failure, not the worker's
            yield _error_chunk(f"The worker failed on this request: {_one_line(error)}; send it again",
                               ErrorCode.INTERNAL_ERROR)
            return
        finally:
            self.scheduler.cancel(request)
        yield self._chunk(new(echo + answer.text), prompt_ids, answer.tokens, answer.finish)

    async def answer(self, params):
        """The whole answer as FastChat's last chunk (the stream's texts joined), or the error."""
        text = ""
        async for chunk in self.stream(params):
            content = json.loads(chunk[:-1])
            text += content["text"]
        return content if content["error_code"] else {**content, "text": text}

    def _chunk(self, text, prompt_ids, generated, finish=None):
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(generated),
                 "total_tokens": len(prompt_ids) + len(generated)}
        return json.dumps({"text": text, "error_code": 0, "usage": usage, "finish_reason": finish}).encode() + b"\0"



def install_routes(app, worker):
    """The worker's routes in place of FastChat's generate routes (which queue behind a semaphore, without
    bound, and keep decoding for a gone client) and its token count (which tokenizes in the event loop), and
    /health; FastChat's embeddings route is removed."""
    remove_routes(app, "/worker_generate_stream", "/worker_generate", "/worker_get_embeddings", "/count_token", "/health")

    async def params_of(request):
        try:
            params = await request.json()
        except ValueError:
            params = None
        return params if isinstance(params, dict) else {}  # no prompt: refused with one line

    @app.post("/worker_generate_stream")
    async def generate_stream(request: Request):
        return StreamWhileClientListens(worker.stream(await params_of(request)))

    @app.post("/worker_generate")
    async def generate(request: Request):
        answered, answer = await unless_client_goes(request, worker.answer(await params_of(request)))
        return answer if answered else Response(status_code=CLIENT_GONE)

    @app.post("/count_token")
    async def count_token(request: Request):  # the API server's length check; tokenized in a thread, as above
        return await asyncio.to_thread(worker.count_token, await params_of(request))

    @app.get("/health")
    async def health():
        status = worker.scheduler.status()
        return {"status": "ok"} if status["healthy"] else unavailable(status["error"])
