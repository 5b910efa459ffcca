#!/usr/bin/env python3
"""An HTTP server for the OpenAI completions API, batching concurrent requests.

POST /v1/completions, GET /v1/models and GET /health, on Starlette and uvicorn, so the official
`openai` client works against it unchanged. Rows of all requests share decode steps
(`batching.Batcher`); bad requests get a 400 with an OpenAI-style error and change nothing.
"""
import asyncio
import json
import math
import re
import signal
import time
import uuid

import cli
import runtime
from errors import UserError

# OpenAI's limits on the completions API.
MAX_N = 128
MAX_STOPS = 4
DEFAULT_MAX_TOKENS = 16
# Accepted for compatibility; any value but these (the API's defaults) is refused as unsupported.
UNSUPPORTED = {"echo": (False,), "best_of": (1,), "suffix": ("",)}
# The generation controls: OpenAI's, then api.generate's under its names, where OpenAI has none.
CONTROLS = ("presence_penalty", "frequency_penalty", "logit_bias", "repetition_penalty", "bad_words", "min_length")
KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "logprobs",
         "stream", "stream_options", "user", *CONTROLS, *UNSUPPORTED}


class ApiError(Exception):
    """A request the API refuses: its status and OpenAI's error body."""

    def __init__(self, message, param=None, code=None, status=400, kind="invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _whole(body, name, default, low, high):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(f"{name} must be a whole number from {low} to {high}, got {value!r}", name)
    return value


def _number(body, name, default):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(f"{name} must be a number, got {value!r}", name)
    return float(value)


def check_window(n_ctx, prompt_length, max_tokens):
    """ApiError unless a prompt and its new tokens fit the window, which a batch does not slide;
    the last new token is never fed back, so they take prompt_length + max_tokens - 1 positions."""
    if prompt_length > n_ctx:
        raise ApiError(f"the prompt is {prompt_length} tokens and the window {n_ctx}: use a prompt "
                       f"{prompt_length - n_ctx} tokens shorter", "prompt", "context_length_exceeded")
    room = n_ctx - prompt_length + 1
    if max_tokens > room:
        raise ApiError(f"the prompt is {prompt_length} tokens and the window {n_ctx}, so {max_tokens} new tokens "
                       f"do not fit: use max_tokens {room} or less, or a shorter prompt", "max_tokens",
                       "context_length_exceeded")


class CompletionRequest:
    """A checked /v1/completions body: prompts as token lists and the sampling settings."""

    def __init__(self, body, model_id, encoder, n_ctx, n_vocab):
        import sample

        if not isinstance(body, dict):
            raise ApiError("the request body must be a JSON object")
        unknown = sorted(set(body) - KNOWN)
        if unknown:
            raise ApiError(f"Unrecognized request argument supplied: {', '.join(unknown)}", unknown[0])
        for name, allowed in UNSUPPORTED.items():
            if body.get(name) is not None and body[name] not in allowed:
                raise ApiError(f"{name} is not supported by this server (leave it out)", name)
        if body.get("model") != model_id:
            raise ApiError(f"The model {body.get('model')!r} does not exist: this server serves {model_id!r} "
                           "(GET /v1/models)", "model", "model_not_found")
        # No prompt means the API's default, "<|endoftext|>": an unconditional sample.
        self.prompts = self._prompts(body.get("prompt", [encoder.eot_token]), encoder, n_vocab)
        self.max_tokens = _whole(body, "max_tokens", DEFAULT_MAX_TOKENS, 1, n_ctx)
        for tokens in self.prompts:
            check_window(n_ctx, len(tokens), self.max_tokens)
        self.n = _whole(body, "n", 1, 1, MAX_N)
        self.logprobs = _whole(body, "logprobs", None, 0, 5)
        self.knobs = dict(temperature=_number(body, "temperature", 1.0), top_p=_number(body, "top_p", 1.0),
                          top_k=_whole(body, "top_k", 0, 0, 2 ** 31 - 1))
        try:
            sample.Knobs.check(**self.knobs)
        except UserError as e:
            raise ApiError(str(e), str(e).split()[0]) from None
        seed = body.get("seed")
        if seed is not None:
            try:
                sample.new_seed(seed)
            except UserError as e:
                raise ApiError(str(e), "seed") from None
        self.seed = seed
        self.controls = self._controls(body, encoder, n_vocab)
        stop = body.get("stop")
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOPS
                                 or not all(isinstance(s, str) for s in stop)):
            raise ApiError(f"stop must be a string or a list of at most {MAX_STOPS} strings", "stop")
        self.stop = stop
        self.stream = body.get("stream") or False
        if not isinstance(self.stream, bool):
            raise ApiError("stream must be true or false", "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise ApiError("stream_options may only hold include_usage", "stream_options")
        self.include_usage = bool(options.get("include_usage"))

    @staticmethod
    def _controls(body, encoder, n_vocab):
        """The checked `processors.Controls`; logit_bias maps token ids written as strings, as
        JSON has its keys, to numbers."""
        import api
        import processors

        values = {name: body[name] for name in CONTROLS if body.get(name) is not None}
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
            if name in values:
                values[name] = _number(body, name, None)
        bias = values.get("logit_bias")
        if isinstance(bias, dict):
            for key, value in bias.items():
                if not re.fullmatch("[0-9]+", key):
                    raise ApiError(f"logit_bias keys must be token ids, like \"50256\", got {key!r}", "logit_bias")
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ApiError(f"logit_bias values must be numbers from -100 to 100, got {value!r}", "logit_bias")
            values["logit_bias"] = {int(key): value for key, value in bias.items()}
        try:
            if "bad_words" in values:
                values["bad_words"] = api.bad_word_ids(encoder, values["bad_words"])
            return processors.Controls.check(**values, n_vocab=n_vocab)
        except UserError as e:
            raise ApiError(str(e), str(e).split()[0]) from None

    @staticmethod
    def _prompts(prompt, encoder, n_vocab):
        """A string, a list of strings, a list of token ids or a list of such lists -> token lists."""
        def tokens_of(item):
            if isinstance(item, str):
                return encoder.encode(item) or [encoder.eot_token]
            if (isinstance(item, list) and item
                    and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < n_vocab for t in item)):
                return item
            raise ApiError("prompt must be a string, a list of strings, a list of token ids or a list of "
                           f"token-id lists (ids from 0 to {n_vocab - 1})", "prompt")

        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            return [tokens_of(p) for p in prompt]
        return [tokens_of(prompt)]

    def row_seed(self, index):
        """Row `index`'s seed: the request's for the first row, one derived from it for the others."""
        import sample

        return sample.new_seed() if self.seed is None else sample.batch_seed(self.seed, index)


class Completion:
    """One request's rows in the batcher and what they make, passed from the batcher's thread
    to the request's event loop as (choice, text, logprobs entry, finish reason) events."""

    def __init__(self, request, batcher, encoder, loop):
        import api
        import batching

        self.request = request
        self.encoder = encoder
        self.events = asyncio.Queue()
        self._loop = loop
        self._texts = {}
        self.rows = []
        for p, prompt in enumerate(request.prompts):
            for c in range(request.n):
                index = p * request.n + c
                self._texts[index] = api.RowText(encoder, request.stop, True)
                self.rows.append(batching.Row(
                    prompt, request.max_tokens, seed=request.row_seed(index), logprobs=request.logprobs,
                    controls=request.controls, on_token=lambda row, token, report, i=index: self._on_token(i, token, report),
                    on_end=lambda row, reason, i=index: self._on_end(i, row, reason), **request.knobs))
        self.completion_tokens = 0
        batcher.submit(self.rows)

    def _put(self, *event):
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            pass  # the event loop has closed: nobody is left to tell

    def _on_token(self, index, token, report):
        text = self._texts[index]
        entry = None
        if not text.finished and not text.ends_at(token):
            self.completion_tokens += 1
            if report is not None:
                logprob, top = report
                entry = (self.encoder.decode([token]), logprob, {self.encoder.decode([t]): v for t, v in top},
                         text.offset)
        piece = text.feed([token])
        if piece or entry:
            self._put(index, piece, entry, None)
        return text.finished

    def _on_end(self, index, row, reason):
        self._put(index, self._texts[index].finish(), None, reason)

    def cancel(self):
        for row in self.rows:
            row.cancel()

    def usage(self):
        prompt_tokens = sum(len(p) for p in self.request.prompts)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt_tokens + self.completion_tokens}

    async def __aiter__(self):
        """The events until every row has ended; a row that failed raises ApiError."""
        open_rows = len(self.rows)
        while open_rows:
            index, piece, entry, reason = await self.events.get()
            if reason in ("error", "cancelled"):
                raise ApiError("generation failed: see the server's log", kind="server_error", status=500)
            open_rows -= reason is not None
            yield index, piece, entry, reason


class Logprobs:
    """A choice's log-probabilities in the completions API's form; `text_offset` gives where each
    token's text begins in the choice's text, streamed or not."""

    def __init__(self):
        self.body = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(self, entry):
        for name, value in zip(("tokens", "token_logprobs", "top_logprobs", "text_offset"), entry):
            self.body[name].append(value)


def create_app(batcher, encoder, model_id):
    """The ASGI app serving `model_id` through a started `batching.Batcher`."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    created = int(time.time())

    def error_response(error):
        return JSONResponse(error.body, status_code=error.status)

    async def health(request):
        rows, waiting = batcher.load()
        return JSONResponse({"status": "ok", "rows": rows, "waiting": waiting, **batcher.stats})

    async def models(request):
        return JSONResponse({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": created, "owned_by": "openai"}]})

    async def completions(request):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error_response(ApiError(f"the request body is not valid JSON ({e})"))
        try:
            checked = CompletionRequest(body, model_id, encoder, batcher.n_ctx, batcher.engine.hparams.n_vocab)
        except ApiError as e:
            return error_response(e)
        completion = Completion(checked, batcher, encoder, asyncio.get_running_loop())
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_id}
        if checked.stream:
            return CompletionStream(completion, head)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            return JSONResponse(await _collect(completion, head, gone))
        except ApiError as e:
            return error_response(e)
        finally:
            gone.cancel()
            completion.cancel()

    async def _collect(completion, head, gone):
        n = len(completion.rows)
        texts, reasons = [""] * n, [None] * n
        logprobs = [Logprobs() if completion.request.logprobs is not None else None for _ in range(n)]
        async for index, piece, entry, reason in _until(completion, gone):
            texts[index] += piece
            reasons[index] = reason or reasons[index]
            if entry:
                logprobs[index].add(entry)
        choices = [{"text": t, "index": i, "logprobs": lp and lp.body, "finish_reason": r}
                   for i, (t, r, lp) in enumerate(zip(texts, reasons, logprobs))]
        return dict(head, choices=choices, usage=completion.usage())

    async def _until(completion, gone):
        """The completion's events, ending early if the client has gone."""
        events = completion.__aiter__()
        while True:
            step = asyncio.ensure_future(events.__anext__())
            await asyncio.wait([step, gone], return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()
                raise ApiError("the client disconnected", status=499)
            try:
                yield step.result()
            except StopAsyncIteration:
                return

    class CompletionStream(StreamingResponse):
        """Server-sent events of a completion; its rows are cancelled when the response ends,
        however it ends (a client gone mid-stream frees its rows before the next step)."""

        def __init__(self, completion, head):
            super().__init__(self._events(completion, head), media_type="text/event-stream")
            self.completion = completion

        @staticmethod
        async def _events(completion, head):
            def event(choices, **extra):
                return f"data: {json.dumps(dict(head, choices=choices, **extra))}\n\n"

            try:
                async for index, piece, entry, reason in completion:
                    logprobs = None
                    if entry:
                        logprobs = Logprobs()
                        logprobs.add(entry)
                        logprobs = logprobs.body
                    yield event([{"text": piece, "index": index, "logprobs": logprobs, "finish_reason": reason}])
            except ApiError as e:
                yield f"data: {json.dumps(e.body)}\n\n"
                return
            if completion.request.include_usage:
                yield event([], usage=completion.usage())
            yield "data: [DONE]\n\n"

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.completion.cancel()

    async def http_error(request, exc):
        return error_response(ApiError(f"{request.method} {request.url.path}: {exc.detail}", status=exc.status_code))

    return Starlette(routes=[Route("/health", health), Route("/v1/models", models),
                             Route("/v1/completions", completions, methods=["POST"])],
                     exception_handlers={HTTPException: http_error})


async def _disconnected(request):
    """Returns once the client has closed its connection."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _ignore(signum, frame):
    pass


@cli.documented(
    "Serves a model over HTTP with the OpenAI completions API (POST /v1/completions, GET /v1/models, "
    "GET /health).\n\nConcurrent requests share decode steps. SIGTERM or Ctrl-C stops taking requests, "
    "finishes those in flight and exits 0.",
    host="Address to listen on (0.0.0.0 for every interface).",
    port="TCP port to listen on.",
    max_batch="Rows decoded together at most (a request with n > 1 or a list of prompts takes several); "
              "with the window it bounds the cache's memory, printed at start.")
def serve(model_name: str = "124M", models_dir: str = "models", host: str = "127.0.0.1", port: int = 8000,
          max_batch: int = 8, dtype: str = "float32", engine: str = "auto"):
    cli.check_whole("port", port, 0)
    cli.check_whole("max_batch", max_batch, 1)
    import litert_engine

    litert_engine.preload(model_name, models_dir, dtype, engine)  # before TensorFlow, for a lower peak
    runtime.fast_start(system_allocator=True)
    import uvicorn

    import api
    import batching

    gpt = api.load(model_name, models_dir, dtype=dtype, engine=engine)
    batcher = batching.Batcher(gpt.sampler.engine, gpt.eot_token, max_rows=max_batch)
    batcher.start()
    warm_up(batcher, gpt.eot_token)
    mib = batcher.cache_bytes() / 2 ** 20
    print(f"serving {model_name} at http://{host}:{port}/v1: up to {max_batch} rows a step; their cache holds at "
          f"most {mib:.1f} MiB ({max_batch} rows x {batcher.n_ctx} positions), twice that while rows join",
          flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(batcher, gpt.encoder, model_name), host=host, port=port,
                                           log_level="warning", timeout_graceful_shutdown=None))
    # uvicorn raises the signal that stopped it again once it has drained: it finds these.
    signal.signal(signal.SIGTERM, _ignore)
    signal.signal(signal.SIGINT, _ignore)
    try:
        server.run()
    except SystemExit:  # uvicorn's way of saying it could not bind, after logging why
        raise UserError(f"cannot listen on {host}:{port}: is another server using it? (try another --port)") from None
    batcher.stop()
    print("stopped: every request in flight was answered", flush=True)


def warm_up(batcher, eot_token):
    """Traces the batcher's compiled functions before the first request, which would wait for it."""
    import batching
    import threading

    ended = threading.Event()
    batcher.submit([batching.Row([eot_token], 2, seed=0, logprobs=1, on_end=lambda row, reason: ended.set())])
    ended.wait()


if __name__ == "__main__":
    cli.run(serve)
