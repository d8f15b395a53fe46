"""An OpenAI-compatible HTTP API over one model: starlette routes, and one worker thread that owns the model.

Requests are read, checked and tokenized on the event loop, then queued; the worker runs them one at a
time (the kernels are not re-entrant) and hands their text pieces back to the loop. A client that goes
away cancels its request: the worker drops it from the queue, or stops it at its next piece. Prompts
reuse the KV cache's longest prefix (moe.runtime.generate), so a conversation's earlier turns and a
repeated system prompt are not run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .errors import MoeError
from .generate import DEFAULT_MAX_TOKENS, chat_ids, generate_ids

MAX_BODY = 4 * 2**20  # bytes of a request body; larger ones are refused before they are read
MAX_QUEUE = 64  # requests waiting or running; more are refused (503) rather than held without end
MAX_STOP = 16  # stop strings of a request (OpenAI takes 4): each is looked for after every token
UNSUPPORTED = {  # field: the value that means "off", the only one accepted (besides null, or [] for a list)
    "n": 1, "best_of": 1, "logprobs": False, "top_logprobs": 0, "echo": False, "suffix": None, "tools": None,
}
# field: (whole numbers only, the test a value passes, what passes in words); any may be left out or null
LIMITS: dict[str, tuple[bool, Callable[[float], bool], str]] = {
    "max_tokens": (True, lambda v: v >= 0, "0 or more"),
    "max_completion_tokens": (True, lambda v: v >= 0, "0 or more"),
    "temperature": (False, lambda v: v >= 0, "0 (greedy) or more"),
    "top_p": (False, lambda v: 0 < v <= 1, "in (0, 1]; 1 turns it off"),
    "top_k": (True, lambda v: v >= 0, "0 (off) or more"),
    "min_p": (False, lambda v: 0 <= v <= 1, "in [0, 1]; 0 turns it off"),
    "seed": (True, lambda v: v >= 0, "0 or more"),
}


class ApiError(Exception):
    """A request the API refuses: its HTTP status and OpenAI's error object."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body, status_code=exc.status)


@dataclass
class Job:
    """One request's prompt and options, and the channel its events come back on: ("piece", text) as the
    text grows, then ("done", Generation) or ("error", ApiError); ("gone", None) if the client left."""

    ids: list[int]
    options: dict  # generate_ids keyword arguments
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def put(self, kind: str, value) -> None:
        """From the worker: hand an event to the request's handler on the event loop."""
        with contextlib.suppress(RuntimeError):  # the loop closed under us (the server is stopping)
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Worker:
    """The one thread that runs the model, taking jobs in the order they came."""

    def __init__(self, model, threads: int):
        self.model = model
        self._threads = threads
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._depth = 0
        self._running: Job | None = None
        self._thread = threading.Thread(target=self._serve, name="moe-generate", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Requests waiting or running."""
        return self._depth

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._depth >= MAX_QUEUE:
                raise ApiError(f"{self._depth} requests are already queued; try again shortly", status=503,
                               kind="server_error", code="queue_full")
            self._depth += 1
        self._jobs.put(job)

    def close(self) -> None:
        """Cancel what is queued and what runs (it stops at its next piece), and stop the thread."""
        running = self._running
        if running is not None:
            running.cancelled.set()
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancelled.set()
                self._finished()
        self._jobs.put(None)
        self._thread.join()

    def _serve(self) -> None:
        import numba

        numba.set_num_threads(self._threads)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            self._running = job
            try:
                self._run(job)
            finally:
                self._running = None
                self._finished()

    def _finished(self) -> None:
        with self._lock:
            self._depth -= 1

    def _run(self, job: Job) -> None:
        if job.cancelled.is_set():
            return
        try:
            generation = generate_ids(self.model, job.ids, **job.options)
            for piece in generation:
                if job.cancelled.is_set():
                    return
                job.put("piece", piece)
            job.put("done", generation)
        except MoeError as exc:
            job.put("error", ApiError(exc.message, status=400 if exc.exit_code == 2 else 500,
                                      kind="invalid_request_error" if exc.exit_code == 2 else "server_error"))
        except Exception as exc:  # the worker must outlive any one request
            job.put("error", ApiError(f"generation failed: {type(exc).__name__}: {exc}", status=500,
                                      kind="server_error"))


class Api:
    """The routes over one model and its worker."""

    def __init__(self, model, name: str):
        import numba  # imported by the model already, after moe.runtime.kernels

        self.model = model
        self.name = name
        self.threads = numba.get_num_threads()  # numba's count is per thread: the loader's, for the worker too
        self.created = int(time.time())
        self.worker: Worker | None = None

    def app(self) -> Starlette:
        routes = [
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ]
        return Starlette(routes=routes, lifespan=self._lifespan,
                         exception_handlers={HTTPException: _http_error, Exception: _unexpected})

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        self.worker = Worker(self.model, self.threads)
        try:
            yield
        finally:
            self.worker.close()

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.name, "queue": self.worker.depth})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.name, "object": "model", "created": self.created, "owned_by": "moe"}]})

    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, chat=False)

    async def _complete(self, request: Request, chat: bool) -> Response:
        try:
            body = await _read_json(request)
            ids = self._chat_prompt(body) if chat else self._text_prompt(body)
            job = Job(ids, _options(body), asyncio.get_running_loop())
            include_usage = _include_usage(body)
            self.worker.submit(job)
        except ApiError as exc:
            return error_response(exc)
        except ClientDisconnect:
            return Response(status_code=499)  # nobody reads it; the request never reached the queue
        reply = _Reply(self.name, chat, len(ids))
        if body.get("stream"):
            return _EventStream(job, reply, include_usage)
        return await _whole(job, reply, request)

    def _chat_prompt(self, body: dict) -> list[int]:
        messages = _messages(body)
        tokenizer = self.model.tokenizer
        if not tokenizer.chat_template:
            raise ApiError(f"the model {self.name} has no chat template; use /v1/completions", "messages")
        try:
            ids = chat_ids(tokenizer, messages)
        except MoeError as exc:
            raise ApiError(exc.message, "messages") from None
        return self._fits(ids, "messages")

    def _text_prompt(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self._fits(self.model.tokenizer.encode(prompt), "prompt")
        vocab = self.model.config.vocab_size
        if isinstance(prompt, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
            bad = [i for i in prompt if not 0 <= i < vocab]
            if bad:
                raise ApiError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", "prompt")
            return self._fits(prompt, "prompt")
        raise ApiError("'prompt' must be a string, a list of one string, or a list of token ids", "prompt")

    def _fits(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise ApiError("the prompt is empty; give some text", param)
        if len(ids) > self.model.max_context:
            raise ApiError(f"the prompt is {len(ids)} tokens, longer than the model's context of "
                           f"{self.model.max_context}; shorten it", param, code="context_length_exceeded")
        return ids


class _Reply:
    """OpenAI's response objects for one request: whole, or as stream chunks."""

    def __init__(self, model: str, chat: bool, prompt_tokens: int):
        self.chat = chat
        self.prompt_tokens = prompt_tokens
        self.head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                     "object": "chat.completion" if chat else "text_completion",
                     "created": int(time.time()), "model": model}

    def whole(self, text: str, generation) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        return {**self.head, "choices": [{**choice, "logprobs": None, "finish_reason": generation.finish_reason}],
                "usage": self.usage(generation)}

    def chunk(self, text: str | None = None, finish_reason: str | None = None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or ""}
            kind = "text_completion"
        return {**self.head, "object": kind, "choices": [{**choice, "logprobs": None, "finish_reason": finish_reason}]}

    def usage_chunk(self, generation) -> dict:
        object_ = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self.head, "object": object_, "choices": [], "usage": self.usage(generation)}

    def usage(self, generation) -> dict:
        done = len(generation.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done,
                "prompt_tokens_details": {"cached_tokens": generation.cached_tokens}}


async def _whole(job: Job, reply: _Reply, request: Request) -> Response:
    """Wait for the job's end, cancelling it if the client leaves first; one JSON body."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancelled.set()
        job.events.put_nowait(("gone", None))

    watcher = asyncio.ensure_future(watch())
    pieces = []
    try:
        while True:
            kind, value = await job.events.get()
            if kind == "piece":
                pieces.append(value)
            elif kind == "error":
                return error_response(value)
            elif kind == "gone":
                return Response(status_code=499)  # nobody reads it
            else:
                return JSONResponse(reply.whole("".join(pieces), value))
    finally:
        watcher.cancel()


class _EventStream(StreamingResponse):
    """Server-sent events of the job's pieces; the job is cancelled whenever the response ends early
    (the client left: starlette cancels the stream when it hears the disconnect)."""

    def __init__(self, job: Job, reply: _Reply, include_usage: bool):
        super().__init__(self._events(job, reply, include_usage), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancelled.set()

    @staticmethod
    async def _events(job: Job, reply: _Reply, include_usage: bool) -> AsyncIterator[str]:
        if reply.chat:
            yield _sse(reply.chunk(role=True))
        while True:
            kind, value = await job.events.get()
            if kind == "piece":
                yield _sse(reply.chunk(value))
            elif kind == "error":
                yield _sse(value.body)
                return
            else:
                yield _sse(reply.chunk(finish_reason=value.finish_reason))
                if include_usage:
                    yield _sse(reply.usage_chunk(value))
                yield "data: [DONE]\n\n"
                return


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _read_json(request: Request) -> dict:
    """The body as a JSON object, refused (413) past MAX_BODY before more of it is read."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise _too_large()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise _too_large()
    try:
        value = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ApiError(f"the body is not valid JSON ({_first_line(exc)})") from None
    if not isinstance(value, dict):
        raise ApiError("the body must be a JSON object")
    return value


def _too_large() -> ApiError:
    return ApiError(f"the body is larger than {MAX_BODY // 2**20} MiB", status=413, code="request_too_large")


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _options(body: dict) -> dict:
    """generate_ids keyword arguments from the request's sampling fields, each checked for type and range."""
    for name, off in UNSUPPORTED.items():
        if body.get(name) not in (off, None, []):
            raise ApiError(f"'{name}' is not supported by moe serve; leave it out", name)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError("'model' must be a string", "model")
    if not isinstance(body.get("stream", False), bool):
        raise ApiError("'stream' must be true or false", "stream")
    values = {name: _number(body, name) for name in LIMITS}
    limit = values["max_completion_tokens"] if values["max_completion_tokens"] is not None else values["max_tokens"]
    options = {
        "max_tokens": DEFAULT_MAX_TOKENS if limit is None else limit,
        "temperature": values["temperature"], "top_k": values["top_k"], "top_p": values["top_p"],
        "min_p": values["min_p"], "seed": values["seed"], "stop": _stop(body.get("stop")),
    }
    return {k: v for k, v in options.items() if v is not None}


def _number(body: dict, name: str):
    value = body.get(name)
    if value is None:
        return None
    whole, ok, allowed = LIMITS[name]
    if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
        raise ApiError(f"'{name}' must be {'an integer' if whole else 'a number'}, not {json.dumps(value)[:40]}", name)
    if not ok(value):
        raise ApiError(f"'{name}' is {value}; it must be {allowed}", name)
    return value


def _stop(stop) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise ApiError("'stop' must be a string or a list of strings", "stop")
    if len(stop) > MAX_STOP:
        raise ApiError(f"'stop' has {len(stop)} strings; give at most {MAX_STOP}", "stop")
    return stop


def _include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise ApiError("'stream_options' must be an object like {\"include_usage\": true}", "stream_options")
    return options.get("include_usage", False)


def _messages(body: dict) -> list[dict]:
    """The conversation as the chat template takes it: role and text content (text parts joined)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    plain = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(f"{where} must be an object with a string 'role'", where)
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(f"{where}.content: only text parts are supported", f"{where}.content")
            content = "".join(p["text"] for p in content)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise ApiError(f"{where}.content must be a string or a list of text parts", f"{where}.content")
        plain.append({"role": message["role"], "content": content})
    return plain


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """404 and 405 from the router, in OpenAI's shape."""
    if exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = (f"no route {request.method} {request.url.path}; there are /v1/chat/completions, /v1/completions, "
                   "/v1/models and /health")
    response = error_response(ApiError(message, status=exc.status_code, code="not_found" if exc.status_code == 404 else None))
    response.headers.update(exc.headers or {})
    return response


async def _unexpected(request: Request, exc: Exception) -> Response:
    return error_response(ApiError(f"internal error: {type(exc).__name__}", status=500, kind="server_error"))
