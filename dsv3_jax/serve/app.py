"""The OpenAI-compatible HTTP API over an `Engine`: a Starlette (ASGI) app for uvicorn.

  POST /v1/chat/completions   messages rendered with the chat format (the built-in DeepSeek-V3
                              renderer, or the checkpoint's chat_template); `stream` (server-sent
                              events), `max_tokens` / `max_completion_tokens`, `temperature`,
                              `top_p`, `seed`, `stop`, `n` (1 only), `stream_options.include_usage`;
                              the answer's <think> reasoning returned as `reasoning_content`, as
                              DeepSeek's own API does
  POST /v1/completions        a text prompt continued as it is (no chat format)
  GET  /v1/models             the one model served
  GET  /health                200 while serving, 503 while shutting down
  GET  /metrics               Prometheus text (serve/metrics.py)

Errors have OpenAI's body, {"error": {"message", "type", "param", "code"}}: 400 for an invalid
parameter or a prompt + max_tokens past the context (the numbers in the message), 404 for another
model name, 429 when the queue is full, 503 while shutting down or after a queue timeout.
Streaming responses start once the request holds a batch slot and has its first token, so those
refusals arrive as statuses too. A client that disconnects cancels its stream (its batch slot is
free at the scheduler's next visit). Each request writes one JSON line to the access log
(`logging.getLogger("dsv3_jax.serve.access")`).

Text comes from decoding all of a stream's tokens so far (a multi-byte character split across
tokens waits for its last byte); the stop strings and the think markers are looked for in that
text, and a tail that could still become one is held back until it is decided.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from dsv3_jax.chat.template import THINK_BEGIN, THINK_END, render_chat
from dsv3_jax.data.special_tokens import BOS, EOS
from dsv3_jax.serve.engine import Engine, Refusal, Request

ACCESS_LOG = logging.getLogger("dsv3_jax.serve.access")
MAX_STOP_STRINGS = 4


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (status, message, param,
                                                                      code, kind)

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind,
                                       "param": self.param, "code": self.code}},
                            status_code=self.status)


def _refused(refusal: Refusal) -> ApiError:
    kind = {429: "rate_limit_error", 503: "service_unavailable"}.get(refusal.status,
                                                                      "invalid_request_error")
    if refusal.status >= 500 and refusal.status != 503:
        kind = "server_error"
    return ApiError(refusal.status, refusal.message, code=refusal.code, kind=kind)


# ---- parameters -------------------------------------------------------------------------------

def _number(body: dict, name: str, default: float, low: float, high: float,
            low_open: bool = False) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > high or value < low or (low_open and value == low):
        bound = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
        raise ApiError(400, f"{name}={value!r} is invalid: it must be a number in {bound}.",
                       param=name)
    return float(value)


def _integer(body: dict, name: str, default, low: int):
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ApiError(400, f"{name}={value!r} is invalid: it must be an integer >= {low}.",
                       param=name)
    return value


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops)
            or len(stops) > MAX_STOP_STRINGS):
        raise ApiError(400, f"stop={stop!r} is invalid: give a non-empty string or a list of at "
                       f"most {MAX_STOP_STRINGS} non-empty strings.", param="stop")
    return stops


class _Params:
    """A request's generation parameters, checked."""

    def __init__(self, body: dict, model_name: str):
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "model is missing: name the model to use (GET /v1/models lists "
                           "it).", param="model")
        if model != model_name:
            raise ApiError(404, f"The model `{model}` does not exist; this server serves "
                           f"`{model_name}`.", param="model", code="model_not_found")
        self.n = _integer(body, "n", 1, 1)
        if self.n != 1:
            raise ApiError(400, f"n={self.n} is not supported: this server returns one choice "
                           "per request (n=1).", param="n")
        self.max_tokens = _integer(body, "max_completion_tokens", None, 1)
        if self.max_tokens is None:
            self.max_tokens = _integer(body, "max_tokens", None, 1)
        self.temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        self.top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
        self.seed = _integer(body, "seed", 0, -(2 ** 63)) % (2 ** 31)  # any int64, as the API
        self.stop = _stops(body)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, f"stream={stream!r} must be true or false.", param="stream")
        self.stream = stream
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise ApiError(400, "stream_options must be an object.", param="stream_options")
        self.include_usage = bool(options.get("include_usage", False))


def _text_parts(messages):
    """Messages whose content is a list of parts ({"type": "text", "text": ...}, as the API
    allows) get their text parts joined; anything else is left for the renderer to judge."""
    if not isinstance(messages, list):
        return messages
    out = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            texts = [p.get("text") for p in content if isinstance(p, dict)]
            kinds = {p.get("type") for p in content if isinstance(p, dict)}
            if kinds == {"text"} and len(texts) == len(content) and all(
                    isinstance(t, str) for t in texts):
                m = {**m, "content": "".join(texts)}
            else:
                raise ApiError(400, "messages: only text content parts ({\"type\": \"text\", "
                               "\"text\": ...}) are supported.", param="messages")
        out.append(m)
    return out


# ---- text: stop strings and reasoning ---------------------------------------------------------

class _Text:
    """The text of a stream's tokens so far, cut at a stop string, split into reasoning and
    content at </think>; `advance` returns the new (reasoning, content) text safe to send."""

    def __init__(self, tokenizer, stops: list[str], stop_tokens, *, reasoning: bool,
                 inside_think: bool):
        self.tokenizer, self.stops, self.stop_tokens = tokenizer, stops, set(stop_tokens)
        self.reasoning, self.inside = reasoning, inside_think
        self.ids: list[int] = []
        self.text = ""
        self.sent = ["", ""]  # reasoning, content already sent
        self.stopped = False  # a stop string was found

    def _split(self, text: str) -> tuple[str, str]:
        if not self.reasoning:
            return "", text
        opened = self.inside or text.lstrip().startswith(THINK_BEGIN)
        if not opened:
            return "", text
        body = text.lstrip()[len(THINK_BEGIN):] if not self.inside else text
        if THINK_END in body:
            thought, answer = body.split(THINK_END, 1)
            return thought, answer
        return body, ""

    def _held(self, text: str, final: bool) -> int:
        """How many characters at the end of `text` could still start a stop string or marker."""
        if final:
            return 0
        marks = self.stops + ([THINK_BEGIN, THINK_END] if self.reasoning else [])
        held = 0
        for mark in marks:
            for k in range(min(len(mark) - 1, len(text)), 0, -1):
                if text.endswith(mark[:k]):
                    held = max(held, k)
                    break
        return held

    def advance(self, tokens: list[int], final: bool = False) -> tuple[str, str]:
        self.ids += [t for t in tokens if t not in self.stop_tokens]
        text = self.tokenizer.decode(self.ids, keep_special=True)
        if not final and text.endswith("\ufffd"):  # a character still missing its last bytes
            return "", ""
        for stop in self.stops:
            at = text.find(stop)
            if at >= 0:
                text, final, self.stopped = text[:at], True, True
        self.text = text
        visible = text[:len(text) - self._held(text, final)]
        parts = self._split(visible)
        out = []
        for i, part in enumerate(parts):
            new = part[len(self.sent[i]):] if part.startswith(self.sent[i]) else ""
            self.sent[i] += new
            out.append(new)
        return out[0], out[1]


# ---- the app ----------------------------------------------------------------------------------

class Server:
    """The routes' shared state: the engine, the tokenizer and chat format, the model's name."""

    def __init__(self, engine: Engine, tokenizer, *, model_name: str, template: str | None = None,
                 stop_tokens=(), poll_seconds: float = 0.25):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.template, self.stop_tokens = template, tuple(stop_tokens)
        self.created = int(time.time())
        self.poll_seconds = poll_seconds

    def render(self, messages) -> str:
        if self.template is None:
            return render_chat(messages)
        return render_chat(messages, template=self.template, bos_token=BOS, eos_token=EOS)

    # The routes ---------------------------------------------------------------------------------
    async def models(self, request: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created,
             "owned_by": "dsv3_jax"}]})

    async def health(self, request: HttpRequest) -> Response:
        if self.engine.stopping or self.engine.error is not None:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return JSONResponse({"status": "ok", "running": self.engine.running,
                             "waiting": self.engine.waiting})

    async def metrics(self, request: HttpRequest) -> Response:
        return PlainTextResponse(self.engine.metrics.render(),
                                 media_type="text/plain; version=0.0.4")

    async def chat(self, request: HttpRequest) -> Response:
        return await self._complete(request, chat=True)

    async def completions(self, request: HttpRequest) -> Response:
        return await self._complete(request, chat=False)

    # The work -----------------------------------------------------------------------------------
    async def _body(self, request: HttpRequest) -> dict:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON.")
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object.")
        return body

    def _prompt(self, body: dict, chat: bool) -> tuple[list[int], str]:
        if chat:
            messages = _text_parts(body.get("messages"))
            try:
                rendered = self.render(messages)
            except ValueError as e:  # MessageError, a template's refusal
                raise ApiError(400, f"messages: {e}", param="messages")
            return self.tokenizer.encode(rendered), rendered
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt), self.tokenizer.decode(prompt, keep_special=True)
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "prompt must be a non-empty string (or one list of token ids).",
                           param="prompt")
        return self.tokenizer.encode(prompt), prompt

    async def _complete(self, request: HttpRequest, chat: bool) -> Response:
        started = time.monotonic()
        log = {"path": request.url.path, "status": 200}
        try:
            if self.engine.stopping:
                raise ApiError(503, "the server is shutting down; retry elsewhere.",
                               code="shutting_down", kind="service_unavailable")
            body = await self._body(request)
            params = _Params(body, self.model_name)
            ids, rendered = self._prompt(body, chat)
            room = self.engine.max_seq_len - len(ids)
            max_tokens = params.max_tokens if params.max_tokens is not None else max(room, 1)
            try:
                self.engine.check(len(ids), max_tokens)
            except Refusal as e:
                raise ApiError(400, e.message, param="max_tokens",
                               code="context_length_exceeded")
            stream = _Stream(self, params, ids, max_tokens, chat=chat,
                             inside_think=chat and rendered.rfind(THINK_BEGIN)
                             > rendered.rfind(THINK_END))
            log.update(id=stream.id, prompt_tokens=len(ids))
            await stream.begin(request)
            if params.stream:
                log["streaming"] = True  # the stream's end writes the access line
                return StreamingResponse(stream.events(request, log, started),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            response = await stream.whole(request)
            log.update(completion_tokens=stream.generated, finish_reason=stream.finish)
            return JSONResponse(response)
        except ApiError as e:
            log["status"] = e.status
            log["error"] = e.code or e.kind
            return e.response()
        except ClientDisconnect:
            log["status"] = 499
            return Response(status_code=499)
        finally:
            if not log.get("streaming"):
                _access(log, started)

    def app(self) -> Starlette:
        routes = [Route("/v1/chat/completions", self.chat, methods=["POST"]),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/health", self.health, methods=["GET"]),
                  Route("/metrics", self.metrics, methods=["GET"])]
        async def not_found(request, exc):
            status = getattr(exc, "status_code", 404)
            message = (f"{request.method} {request.url.path} is not a route of this server "
                       "(POST /v1/chat/completions, POST /v1/completions, GET /v1/models, "
                       "/health, /metrics).")
            return ApiError(status, message, code="not_found" if status == 404
                            else "method_not_allowed").response()

        return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


def _access(log: dict, started: float) -> None:
    log["duration_ms"] = round(1e3 * (time.monotonic() - started), 1)
    ACCESS_LOG.info(json.dumps(log, sort_keys=True))


class _Stream:
    """One request's round trip: submitted to the engine, its events turned into API objects."""

    def __init__(self, server: Server, params: _Params, ids: list[int], max_tokens: int, *,
                 chat: bool, inside_think: bool):
        self.server, self.params, self.chat = server, params, chat
        self.prompt_tokens = len(ids)
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.text = _Text(server.tokenizer, params.stop, server.stop_tokens, reasoning=chat,
                          inside_think=inside_think)
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.request = Request(
            prompt=ids, max_new_tokens=max_tokens, temperature=params.temperature,
            top_p=params.top_p, seed=params.seed, stop_tokens=server.stop_tokens,
            on_event=lambda kind, value: loop.call_soon_threadsafe(
                self.queue.put_nowait, (kind, value)))
        self.generated, self.finish = 0, None
        self._first = None  # the first event, waited for before a response starts

    async def _next(self, request: HttpRequest):
        """The next engine event; cancels the stream when the client has gone."""
        while True:
            try:
                return await asyncio.wait_for(self.queue.get(), self.server.poll_seconds)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.request.cancel()
                    raise ClientDisconnect()

    async def begin(self, request: HttpRequest) -> None:
        """Submits; waits for the first event, so refusals become statuses (ApiError)."""
        try:
            self.server.engine.submit(self.request)
        except Refusal as e:
            raise _refused(e)
        try:
            self._first = await self._next(request)
        except BaseException:
            self.request.cancel()
            raise
        if self._first[0] == "error":
            raise _refused(self._first[1])

    async def _events(self, request: HttpRequest):
        """(reasoning, content) text deltas until the end; sets finish and generated."""
        event = self._first
        while True:
            kind, value = event
            if kind == "tokens":
                self.generated += len(value)
                delta = self.text.advance(value)
                if self.text.stopped:
                    self.request.cancel()
                    self.finish = "stop"
                    yield delta
                    return
                yield delta
            elif kind == "done":
                self.finish = "length" if value == "length" else "stop"
                yield self.text.advance([], final=True)
                return
            else:
                raise _refused(value)
            event = await self._next(request)

    def _usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.generated,
                "total_tokens": self.prompt_tokens + self.generated}

    async def whole(self, request: HttpRequest) -> dict:
        reasoning, content = [], []
        async for r, c in self._events(request):
            reasoning.append(r)
            content.append(c)
        reasoning, content = "".join(reasoning), "".join(content)
        if self.chat:
            message = {"role": "assistant", "content": content}
            if self.text.reasoning and (reasoning or self.text.inside
                                        or self.text.text.lstrip().startswith(THINK_BEGIN)):
                message["reasoning_content"] = reasoning
            choice = {"index": 0, "message": message, "finish_reason": self.finish,
                      "logprobs": None}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": content, "finish_reason": self.finish,
                      "logprobs": None}
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created,
                "model": self.server.model_name, "choices": [choice], "usage": self._usage()}

    def _chunk(self, delta: dict | None = None, finish=None, usage=None) -> str:
        if self.chat:
            choices = [] if delta is None else [{"index": 0, "delta": delta,
                                                 "finish_reason": finish, "logprobs": None}]
            kind = "chat.completion.chunk"
        else:
            choices = [] if delta is None else [{"index": 0, "text": delta.get("content", ""),
                                                 "finish_reason": finish, "logprobs": None}]
            kind = "text_completion"
        chunk = {"id": self.id, "object": kind, "created": self.created,
                 "model": self.server.model_name, "choices": choices}
        if usage is not None:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk)}\n\n"

    async def events(self, request: HttpRequest, log: dict, started: float):
        try:
            if self.chat:
                yield self._chunk({"role": "assistant", "content": ""})
            async for reasoning, content in self._events(request):
                if reasoning:
                    yield self._chunk({"reasoning_content": reasoning})
                if content:
                    yield self._chunk({"content": content})
            yield self._chunk({}, finish=self.finish)
            if self.params.include_usage:
                yield self._chunk(None, usage=self._usage())
            yield "data: [DONE]\n\n"
        except ApiError as e:  # the engine failed mid-stream: an error event, then the end
            log["status"] = e.status
            yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.kind}})}\n\n"
        except (ClientDisconnect, asyncio.CancelledError):
            self.request.cancel()
            log["status"] = 499
            raise
        finally:
            self.request.cancel()  # a no-op once finished; frees the slot when the client left
            log.update(completion_tokens=self.generated, finish_reason=self.finish)
            _access({k: v for k, v in log.items() if k != "streaming"}, started)


def create_app(engine: Engine, tokenizer, *, model_name: str, template: str | None = None,
               stop_tokens=()) -> Starlette:
    return Server(engine, tokenizer, model_name=model_name, template=template,
                  stop_tokens=stop_tokens).app()


__all__ = ["ApiError", "Server", "create_app"]
