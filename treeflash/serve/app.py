"""`treeflash serve`: an OpenAI-compatible HTTP server over one target and drafter.

Endpoints: POST /v1/chat/completions and /v1/completions (streamed as server-sent events or not),
GET /v1/models, /health and /metrics (Prometheus text format). docs/serving.md is the user's guide.

How a request flows:

    HTTP handler (asyncio)        parse and validate the body, tokenize the prompt  -> 400 on bad input
      -> Engine.submit            the request waits in a bounded queue              -> 503 when full
      -> the engine thread        runs up to `max_batch` generations batched, one round at a time, turns
                                  each round's committed tokens into text and cuts stop sequences
                                  (treeflash.serve.scheduler)
      -> asyncio.Queue            text deltas and the final outcome flow back to the handler

This module is the HTTP layer: parsing, responses, errors, metrics. A client that disconnects cancels its
job; the generation stops at its next round. Every error a client can cause is an OpenAI-format error,
{"error": {"message", "type", "param", "code"}}, with one sentence saying what was wrong; nothing a client
sends can stop the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import numbers
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from ..decoding import METHODS, DecodeConfig, resolve_budget
from ..errors import TreeFlashError
from .metrics import CONTENT_TYPE, Metrics
from .scheduler import Engine, EngineBusy, Failure, Job, Outcome, Request

log = logging.getLogger("treeflash.serve")

MAX_BODY_BYTES = 4 << 20  # a request body larger than this is refused (413) before it is parsed
MAX_STOP_SEQUENCES = 4  # as OpenAI
STREAM_POLL_SECONDS = 0.25  # how often a non-streaming handler checks that its client is still there
# Request fields for features this server does not implement: refused when set, rather than ignored.
UNSUPPORTED = ("logprobs", "top_logprobs", "tools", "functions", "function_call", "logit_bias", "echo", "suffix",
               "presence_penalty", "frequency_penalty")


@dataclasses.dataclass
class ServeConfig:
    """How the server runs. `treeflash serve` flags map one-to-one onto these fields."""

    host: str = "127.0.0.1"  # address to listen on
    port: int = 8000  # port to listen on
    model_name: str | None = None  # the id clients pass as `model`; None = the target's name
    method: str = "treeflash"  # decoding method of requests that name none (one of METHODS)
    budget: int | None = None  # draft nodes per round for requests that name none; None = the method's default
    max_queue: int = 64  # requests that may wait for the engine; one more gets 503
    max_batch: int = 8  # generations run at once, batched round by round; 1 = one request at a time
    max_tokens_limit: int = 1024  # the most new tokens a request may ask for; also the default max_tokens
    max_budget: int = 512  # the largest per-request budget (a tree's cost grows with it)

    def __post_init__(self):
        if self.method not in METHODS:
            raise TreeFlashError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        for name, low in (("port", 0), ("max_queue", 0), ("max_batch", 1), ("max_tokens_limit", 1),
                          ("max_budget", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise TreeFlashError(f"{name} must be a whole number >= {low}; got {value!r}")
        if self.port > 65535:
            raise TreeFlashError(f"port must be at most 65535; got {self.port}")
        if self.budget is not None:
            DecodeConfig(budget=self.budget)  # validates it
            if self.budget > self.max_budget:
                raise TreeFlashError(f"budget {self.budget} is above max_budget {self.max_budget}; raise --max-budget")


# --------------------------------------------------------------------------------------------------
# Errors in the OpenAI format


class APIError(Exception):
    """An error for the client: HTTP status plus OpenAI's {"message", "type", "param", "code"}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def _server_error(failure: Failure) -> APIError:
    return APIError(500, failure.message, type="server_error")


_KIND_NAMES = {int: "a whole number", float: "a number", str: "a string", bool: "true or false",
               list: "an array", dict: "an object"}


def _field(body: dict, name: str, kind: type, default=None):
    """body[name] checked to be of `kind` (an int passes as a float; a bool passes only as a bool)."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, bool) if kind is bool else (
        not isinstance(value, bool) and isinstance(value, numbers.Real if kind is float else kind))
    if not ok:
        raise _invalid(f"{name} must be {_KIND_NAMES[kind]}; got {json.dumps(value)[:80]}", name)
    return value


# --------------------------------------------------------------------------------------------------
# Parsing a request


@dataclasses.dataclass
class GenerationRequest(Request):
    """A validated completion request, ready for the engine (prompt_ids, config, stops, stream: see Request)."""

    kind: str = "chat"  # "chat" or "text"
    include_usage: bool = False  # stream_options.include_usage: one more chunk, with usage and no choices
    return_token_ids: bool = False  # add the completion's token ids to the choice (as vLLM does)


def _messages(body: dict) -> list[dict]:
    """The chat messages as [{"role", "content": str}], text content parts joined."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages must be a non-empty array of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _invalid(f"{param} must be an object with a role and a content", param)
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise _invalid(f"{param}.role must be system, developer, user or assistant; got {role!r}",
                           f"{param}.role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _invalid(f"{param}.content may hold only text parts ({{type: text, text}})", f"{param}.content")
            content = "\n".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _invalid(f"{param}.content must be a string or an array of text parts", f"{param}.content")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_SEQUENCES
            or not all(isinstance(s, str) and s for s in stops)):
        raise _invalid(f"stop must be a non-empty string or an array of at most {MAX_STOP_SEQUENCES} of them",
                       "stop")
    return tuple(stops)


def _refuse_unsupported(body: dict) -> None:
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, 0, "", [], {}):
            raise _invalid(f"{name} is not supported by this server; leave it out", name, "unsupported_parameter")
    if body.get("tool_choice") not in (None, "none"):
        raise _invalid("tool_choice is not supported by this server; leave it out", "tool_choice",
                       "unsupported_parameter")
    if body.get("response_format") not in (None, {"type": "text"}):
        raise _invalid("response_format other than text is not supported by this server", "response_format",
                       "unsupported_parameter")
    if body.get("best_of") not in (None, 1):
        raise _invalid("best_of must be 1: this server returns one choice per request", "best_of")


class _Cancelled(Exception):
    """The client of a request has gone away."""


# --------------------------------------------------------------------------------------------------
# The server, independent of the web framework


@dataclasses.dataclass
class JSONReply:
    status: int
    body: dict


@dataclasses.dataclass
class EventStream:
    chunks: AsyncIterator[str]  # "data: {json}\n\n" ..., "data: [DONE]\n\n"


@dataclasses.dataclass
class TextReply:
    text: str
    media_type: str


def _sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, allow_nan=False)}\n\n"


class Server:
    """Parses OpenAI requests, runs them on the engine, and formats OpenAI responses."""

    def __init__(self, decoder, config: ServeConfig):
        self.decoder, self.config = decoder, config
        self.target = decoder.target
        if self.target.tokenizer is None:
            raise TreeFlashError("the target has no tokenizer, which serving text needs; load it from a model directory")
        # The default method must be one this decoder can run: without a drafter only ar, without a head no
        # treeflash (requests that ask for those explicitly still get a 400).
        if decoder.drafter is None and config.method != "ar":
            fallback, missing = "ar", "a drafter"
        elif decoder.drafter is not None and decoder.drafter.ar_approximation is None and config.method == "treeflash":
            fallback, missing = "ddtree", "a TreeFlash head"
        else:
            fallback = None
        if fallback:
            log.warning("the default method %s needs %s; serving %s by default", config.method, missing, fallback)
            config = self.config = dataclasses.replace(config, method=fallback)
        self.model_name = config.model_name or self.target.name
        self.created = int(time.time())
        self.metrics = Metrics()
        self.engine = Engine(decoder, config.max_batch, config.max_queue, self.metrics)

    # -- endpoints ----------------------------------------------------------------------------------

    async def create(self, kind: str, body: bytes, disconnected: Callable[[], Awaitable[bool]]):
        """POST /v1/chat/completions (kind "chat") or /v1/completions (kind "text")."""
        request = await self._parse(kind, body)
        job = Job(request, asyncio.get_running_loop(), asyncio.Queue())
        try:
            self.engine.submit(job)
        except EngineBusy as e:
            raise APIError(503, str(e), code="server_overloaded", type="server_error") from None
        self.metrics.prompt_tokens.inc(len(request.prompt_ids))
        reply_id = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
        if request.stream:
            return EventStream(self._stream(job, reply_id))
        try:
            event = await self._next_event(job, disconnected)
        finally:
            job.cancel()  # the client left, or this is a no-op: the job is over
        if isinstance(event, Failure):
            raise _server_error(event)
        return JSONReply(200, self._response(kind, reply_id, event, request.return_token_ids))

    def models(self) -> JSONReply:
        return JSONReply(200, {"object": "list", "data": [self._model_card()]})

    def model(self, name: str) -> JSONReply:
        self._check_model(name)
        return JSONReply(200, self._model_card())

    def health(self) -> JSONReply:
        return JSONReply(200, {"status": "ok", "model": self.model_name, "queue_length": self.engine.waiting,
                               "active_generations": self.engine.active})

    def metrics_text(self) -> TextReply:
        return TextReply(self.metrics.render(self.engine.waiting, self.engine.active), CONTENT_TYPE)

    # -- requests -----------------------------------------------------------------------------------

    async def _parse(self, kind: str, raw: bytes) -> GenerationRequest:
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, or nested too deeply to parse
            raise _invalid(f"the request body is not valid JSON ({type(e).__name__}: {e}); send a JSON object") from None
        if not isinstance(body, dict):
            raise _invalid("the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str):
            raise _invalid("you must provide a model parameter (a string); see GET /v1/models", "model")
        self._check_model(model)
        _refuse_unsupported(body)
        if _field(body, "n", int, 1) != 1:
            raise _invalid("n must be 1: this server returns one choice per request", "n")
        stream = _field(body, "stream", bool, False)
        options = _field(body, "stream_options", dict, {})
        include_usage = options.get("include_usage") is True
        stops = _stops(body)
        config, max_tokens = self._decode_config(body)

        if kind == "chat":
            messages = _messages(body)
            prompt_ids = await asyncio.to_thread(self._encode_chat, messages)
        else:
            prompt_ids = await asyncio.to_thread(self._encode_text, body.get("prompt"))
        limit, n = self.target.max_length, len(prompt_ids)
        if n >= limit:
            raise _invalid(f"this model's context holds {limit} tokens, but the prompt has {n}; shorten the prompt",
                           "messages" if kind == "chat" else "prompt", "context_length_exceeded")
        if max_tokens is not None and n + max_tokens > limit:
            raise _invalid(f"this model's context holds {limit} tokens, but the prompt has {n} and max_tokens asks "
                           f"for {max_tokens} more; lower max_tokens or shorten the prompt",
                           "max_tokens", "context_length_exceeded")
        max_new_tokens = max_tokens or min(self.config.max_tokens_limit, limit - n)
        config = dataclasses.replace(config, max_new_tokens=max_new_tokens)
        return GenerationRequest(prompt_ids=prompt_ids, config=config, stops=stops, stream=stream, kind=kind,
                                 include_usage=include_usage,
                                 return_token_ids=_field(body, "return_token_ids", bool, False))

    def _decode_config(self, body: dict) -> tuple[DecodeConfig, int | None]:
        """Sampling and speculative fields -> a DecodeConfig, and max_tokens (None when not given; the
        default depends on the prompt's length)."""
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _field(body, name, int)
        limit = self.config.max_tokens_limit
        if max_tokens is not None and not 1 <= max_tokens <= limit:
            raise _invalid(f"{name} must be between 1 and {limit} on this server; got {max_tokens}", name)
        temperature = _field(body, "temperature", float, 1.0)  # OpenAI's default
        if not (math.isfinite(temperature) and 0 <= temperature <= 2):
            raise _invalid(f"temperature must be between 0 and 2 (0 = greedy); got {temperature}", "temperature")
        top_p = _field(body, "top_p", float, 1.0)
        if not 0 < top_p <= 1:
            raise _invalid(f"top_p must be in (0, 1]; got {top_p}", "top_p")
        top_k = _field(body, "top_k", int, 0)
        if top_k < 0:
            raise _invalid(f"top_k must be >= 0 (0 = off); got {top_k}", "top_k")
        seed = _field(body, "seed", int)
        if seed is None and temperature > 0:
            seed = secrets.randbits(63)  # drawn here so that the response can report it
        method = _field(body, "method", str, self.config.method)
        if method not in METHODS:
            raise _invalid(f"method must be one of {', '.join(METHODS)}; got {method!r}", "method")
        drafter = self.decoder.drafter
        if method != "ar" and drafter is None:
            raise _invalid(f"method {method!r} needs a drafter and this server has none; use method 'ar'", "method")
        if method == "treeflash" and drafter.ar_approximation is None:
            raise _invalid("method 'treeflash' needs a drafter with a TreeFlash head; use 'ddtree' on this server",
                           "method")
        budget = _field(body, "budget", int, self.config.budget)
        if budget is not None and not 1 <= budget <= self.config.max_budget:
            raise _invalid(f"budget must be between 1 and {self.config.max_budget} draft nodes on this server; "
                           f"got {budget}", "budget")
        if method != "ar":  # resolved here as Decoder.generate does, so that it can be reported
            budget = resolve_budget(method, budget, drafter, self.decoder.tuning, self.target.device)
        lookup = _field(body, "lookup", int, None)
        if lookup is not None and not 0 <= lookup <= self.config.max_budget:
            raise _invalid(f"lookup must be between 0 and {self.config.max_budget} tokens on this server; "
                           f"got {lookup}", "lookup")
        ignore_eos = _field(body, "ignore_eos", bool, False)
        try:
            config = DecodeConfig(method=method, budget=budget, temperature=float(temperature), top_p=float(top_p),
                                  top_k=top_k, seed=seed, stop_at_eos=not ignore_eos, lookup=lookup)
        except TreeFlashError as e:
            raise _invalid(str(e)) from None
        return config, max_tokens

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`",
                           "model", "model_not_found")

    def _encode_chat(self, messages: list[dict]) -> list[int]:
        tokenizer = self.target.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise _invalid("this model's tokenizer has no chat template; use /v1/completions with a raw prompt")
        try:
            with self.engine.tokenizer_lock:
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        except Exception as e:  # the template's own checks (say, roles must alternate) raise arbitrary types
            raise _invalid(f"the chat template refused these messages: {e}", "messages") from None
        return [int(i) for i in ids]

    def _encode_text(self, prompt) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, list) and any(isinstance(p, (str, list)) for p in prompt):
            raise _invalid("this server takes one prompt per request; send the others in requests of their own",
                           "prompt")
        if isinstance(prompt, list):  # token ids
            vocab = self.target.embed_tokens.weight.shape[0]
            if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                     for t in prompt):
                raise _invalid(f"prompt must be a string, or one non-empty array of token ids in [0, {vocab})",
                               "prompt")
            return list(prompt)
        if not isinstance(prompt, str):
            raise _invalid("prompt must be a string (one prompt per request) or an array of token ids", "prompt")
        try:
            with self.engine.tokenizer_lock:
                return self.target.encode_prompt(prompt, chat=False)
        except TreeFlashError as e:
            raise _invalid(str(e), "prompt") from None

    # -- responses ----------------------------------------------------------------------------------

    async def _next_event(self, job: Job, disconnected: Callable[[], Awaitable[bool]]):
        """The job's next Outcome or Failure; text deltas are skipped. Raises _Cancelled if the client left."""
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), STREAM_POLL_SECONDS)
            except asyncio.TimeoutError:
                if await disconnected():
                    raise _Cancelled from None
                continue
            if not isinstance(event, str):
                return event

    def _head(self, kind: str, reply_id: str) -> dict:
        return {"id": reply_id, "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": int(time.time()), "model": self.model_name}

    @staticmethod
    def _usage(o: Outcome) -> dict:
        return {"prompt_tokens": o.prompt_tokens, "completion_tokens": o.completion_tokens,
                "total_tokens": o.prompt_tokens + o.completion_tokens}

    def _response(self, kind: str, reply_id: str, o: Outcome, return_token_ids: bool = False) -> dict:
        choice = {"index": 0, "finish_reason": o.finish_reason, "logprobs": None}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": o.text}
        else:
            choice["text"] = o.text
        if return_token_ids:
            choice["token_ids"] = o.token_ids
        return {**self._head(kind, reply_id), "choices": [choice], "usage": self._usage(o), "treeflash": o.stats}

    async def _stream(self, job: Job, reply_id: str) -> AsyncIterator[str]:
        kind = job.request.kind
        head = self._head(kind, reply_id)
        head["object"] = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(text: str | None, finish_reason: str | None = None, role: bool = False) -> dict:
            choice = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
            if kind == "chat":
                choice["delta"] = ({"role": "assistant", "content": ""} if role else
                                   {} if text is None else {"content": text})
            else:
                choice["text"] = text or ""
            return {**head, "choices": [choice]}

        try:
            if kind == "chat":
                yield _sse(chunk(None, role=True))
            while True:
                event = await job.events.get()
                if isinstance(event, str):
                    yield _sse(chunk(event))
                    continue
                if isinstance(event, Failure):
                    yield _sse(_server_error(event).body())
                else:
                    yield _sse({**chunk(None, event.finish_reason), "usage": self._usage(event),
                                "treeflash": event.stats})
                    if job.request.include_usage:
                        yield _sse({**head, "choices": [], "usage": self._usage(event), "treeflash": event.stats})
                yield "data: [DONE]\n\n"
                return
        finally:
            job.cancel()  # the client disconnected (this generator was cancelled), or a no-op

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "treeflash"}


# --------------------------------------------------------------------------------------------------
# HTTP (Starlette + uvicorn, imported only here: they are the `serve` extra)


ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


def build_app(server: Server):
    """The Starlette application over `server`."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    def respond(reply) -> Response:
        if isinstance(reply, EventStream):
            return StreamingResponse(reply.chunks, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        if isinstance(reply, TextReply):
            return Response(reply.text, media_type=reply.media_type)
        return JSONResponse(reply.body, status_code=reply.status)

    def error(e: APIError) -> Response:
        return JSONResponse(e.body(), status_code=e.status)

    def completions(kind: str):
        async def endpoint(request):
            try:
                body = await _read_body(request)
                return respond(await server.create(kind, body, request.is_disconnected))
            except APIError as e:
                return error(e)
            except _Cancelled:  # the client is gone; this response goes nowhere
                return Response(status_code=499)
        return endpoint

    async def models(request):
        return respond(server.models())

    async def model(request):
        try:
            return respond(server.model(request.path_params["model"]))
        except APIError as e:
            return error(e)

    async def health(request):
        return respond(server.health())

    async def metrics(request):
        return respond(server.metrics_text())

    async def http_error(request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = {404: f"there is no endpoint {request.url.path}; see /v1/models, /v1/chat/completions, "
                        "/v1/completions, /health and /metrics",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        return error(APIError(exc.status_code, message, code=code))

    async def server_error(request, exc: Exception):
        return error(APIError(500, f"internal error ({type(exc).__name__}); the server logs have the details",
                              type="server_error"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        server.engine.close()

    routes = [
        Route("/v1/chat/completions", completions("chat"), methods=["POST"]),
        Route("/v1/completions", completions("text"), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    return Starlette(routes=routes, middleware=[Middleware(_MeasureRequests, metrics=server.metrics)],
                     exception_handlers={HTTPException: http_error, Exception: server_error}, lifespan=lifespan)


async def _read_body(request) -> bytes:
    """The body, or 413 if it is too large. The rest of a large body is read and dropped, so that a client
    that sends it all before reading the response gets the response rather than a reset connection."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= MAX_BODY_BYTES:
            chunks.append(chunk)
    if size > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB; send a shorter prompt",
                       code="request_too_large")
    return b"".join(chunks)


class _MeasureRequests:
    """ASGI middleware: counts requests by endpoint and status, and times them to their last byte."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            path = scope["path"]
            endpoint = path if path in ENDPOINTS else "/v1/models/{model}" if path.startswith("/v1/models/") else "other"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - start)


def uvicorn_server(server: Server, host: str, port: int, log_level: str = "info"):
    """A uvicorn.Server for `server` (call .run(), or .run(sockets=[...]) with a socket already bound)."""
    import uvicorn

    config = uvicorn.Config(build_app(server), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=5)  # then open streams are cancelled, and their generations
    return uvicorn.Server(config)
