"""The serving engine: requests queue up, and one thread runs their generations batched, round by round.

    Engine.submit(job)      a validated request joins a bounded queue                  -> EngineBusy when full
    the engine thread       loop: admit waiting jobs while fewer than `max_batch` run (each becomes a
                            `Generation`); `Decoder.step` over all running ones (one drafter pass, the
                            TreeFlash head's rows together, one target pass that also prefills the new
                            ones); finished ones leave, and their places go to waiting jobs
    Job.emit                text deltas, then an Outcome or a Failure, go back to the HTTP handler's event
                            loop (see serving.py)

This is continuous batching: a request joins the batch at the next round after it arrives and leaves as
soon as it ends, so a short request is never stuck behind a long one. Requests in one batch may use
different methods, budgets, temperatures and seeds; each one's output is what it would be alone (tokens
come from its own logits rows and its own (seed, position) noise; tests/test_batching.py).

A job whose client went away is cancelled: it is skipped if it is still waiting, and stops at its next
round otherwise. One job's failure (say, in its detokenizer) ends that job only; a failure of a batched pass
ends the jobs of that batch with a Failure, and the engine goes on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable

from ..decoding import DecodeConfig, Generation
from ..errors import TreeFlashError

log = logging.getLogger("treeflash.serve")


# --------------------------------------------------------------------------------------------------
# Text: committed tokens -> deltas, cut at stop sequences


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop sequence starts in `text`, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _safe_end(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` can be shown: not a trailing incomplete character (U+FFFD while its bytes are
    split across tokens), nor a tail that may yet grow into a stop sequence."""
    full = len(text.rstrip("\ufffd"))
    end = full
    for s in stops:
        for k in range(min(len(s) - 1, full), 0, -1):
            if text.endswith(s[:k], 0, full):
                end = min(end, full - k)
                break
    return end


class Detokenizer:
    """Turns each round's committed tokens into the text to send, and finds stop sequences.

    The text is decoded from all tokens every round (a token's text can depend on its neighbours, and it
    is what `DecodeResult.text` holds); `completion_tokens` counts the tokens up to the one that completed
    a stop sequence, so it does not depend on how many tokens the method committed in that round."""

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...] = ()):
        self.decode, self.stops = decode, stops
        self.tokens: list[int] = []
        self.text = ""  # the generated text so far, cut at a stop sequence once one is found
        self.shown = 0  # characters of `text` already handed out
        self.stopped = False  # a stop sequence was found
        self.completion_tokens = 0

    def add(self, new: list[int]) -> str:
        """Add committed tokens; return the text that is now safe to send."""
        before = len(self.tokens)
        self.tokens.extend(new)
        text = self.decode(self.tokens)
        cut = _first_stop(text, self.stops)
        if cut is None:
            self.text, self.completion_tokens = text, len(self.tokens)
            return self._show(_safe_end(text, self.stops))
        self.text, self.stopped = text[:cut], True
        self.completion_tokens = next(k for k in range(before + 1, len(self.tokens) + 1)
                                      if _first_stop(self.decode(self.tokens[:k]), self.stops) is not None)
        return self._show(cut)

    def finish(self) -> str:
        """The text held back so far (the generation is over)."""
        return self._show(len(self.text))

    def _show(self, end: int) -> str:
        delta = self.text[self.shown:end] if end > self.shown else ""
        self.shown = max(self.shown, end)
        return delta


# --------------------------------------------------------------------------------------------------
# Jobs and what they report


@dataclasses.dataclass
class Request:
    """What the engine needs of a validated request."""

    prompt_ids: list[int]
    config: DecodeConfig  # budget resolved, seed drawn when sampling (both reported back)
    stops: tuple[str, ...] = ()  # cut from the text; the generation ends at the first one
    stream: bool = False  # whether text deltas are emitted as they come


@dataclasses.dataclass
class Outcome:
    """How a generation ended: what the response reports."""

    text: str
    finish_reason: str  # OpenAI's: "stop" (EOS or a stop sequence) or "length" (max_tokens or the context)
    prompt_tokens: int
    completion_tokens: int
    stats: dict  # the response's `treeflash` object (see `Engine._stats`)
    token_ids: list[int] = dataclasses.field(default_factory=list)  # the completion's tokens (completion_tokens of them)


@dataclasses.dataclass
class Failure:
    """A generation that failed on the server's side (a bug or an exhausted resource): an HTTP 500."""

    message: str


class EngineBusy(TreeFlashError):
    """The queue is full (an HTTP 503)."""


@dataclasses.dataclass(eq=False)  # hashed by identity
class Job:
    """One request inside the engine, and the way its events get back to the event loop."""

    request: Request
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue  # str (a text delta, streaming only), then an Outcome or a Failure
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    admitted: float | None = None  # when it joined the batch
    first_token: float | None = None  # when its first token was committed
    text: Detokenizer | None = None
    generation: Generation | None = None

    def emit(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()


# --------------------------------------------------------------------------------------------------
# The engine


class Engine:
    """Runs jobs batched on one thread: at most `max_batch` generations at once, `max_queue` more waiting.

    metrics: the server's `treeflash.serve.metrics.Metrics`."""

    def __init__(self, decoder, max_batch: int, max_queue: int, metrics):
        self.decoder, self.max_batch, self.max_queue, self.metrics = decoder, max_batch, max_queue, metrics
        self.tokenizer_lock = threading.Lock()  # a Hugging Face tokenizer is not safe to share between threads
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._running: list[Job] = []
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="treeflash-engine", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Jobs submitted and not yet admitted to the batch."""
        return len(self._queue)

    @property
    def active(self) -> int:
        """Jobs in the batch."""
        return len(self._running)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise EngineBusy("the server is shutting down; retry on another server")
            if len(self._queue) >= self.max_queue:
                raise EngineBusy(f"the server is busy: {len(self._queue)} requests are already waiting; retry later")
            self._queue.append(job)
            self._cond.notify()

    def close(self) -> None:
        """Cancel every job (each running one stops at its next round) and stop the engine thread."""
        with self._cond:
            self._closed = True
            for job in list(self._queue) + self._running:
                job.cancel()
            self._cond.notify()
        self._thread.join(30)

    # -- the loop -----------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._running or self._closed)
                if self._closed and not self._running:
                    for job in self._queue:
                        self._cancelled(job)
                    self._queue.clear()
                    return
                admitted = []
                while self._queue and len(self._running) + len(admitted) < self.max_batch:
                    admitted.append(self._queue.popleft())
            for job in admitted:
                self._admit(job)
            if not self._running:
                continue
            self.metrics.batch_size.observe(len(self._running))
            try:
                self.decoder.step([job.generation for job in self._running])
            except Exception as e:  # a bug or an exhausted resource: this batch fails, the engine goes on
                log.exception("a batched round failed")
                for job in self._running:
                    self._fail(job, e)
                with self._cond:
                    self._running = []
                continue
            finished = [job for job in self._running if job.generation.done]
            for job in finished:
                self._finish(job)
            if finished:
                with self._cond:
                    self._running = [job for job in self._running if not job.generation.done]

    def _admit(self, job: Job) -> None:
        if job.cancelled.is_set():  # its client left while it waited: do not even prefill
            self._cancelled(job)
            return
        request = job.request
        job.admitted = time.perf_counter()
        job.text = Detokenizer(self._decode, request.stops)
        try:
            job.generation = self.decoder.start(request.prompt_ids, request.config,
                                                on_tokens=lambda new, job=job: self._on_tokens(job, new))
        except Exception as e:  # requests are validated before they queue; this would be a bug
            log.exception("a generation could not start")
            self._fail(job, e)
            return
        with self._cond:
            self._running.append(job)

    def _on_tokens(self, job: Job, new: list[int]) -> bool:
        """A round's committed tokens: into text, out to the client. True stops the generation."""
        if job.cancelled.is_set():
            return True
        method = job.request.config.method
        if job.first_token is None:
            job.first_token = time.perf_counter()
            self.metrics.time_to_first_token.labels(method).observe(job.first_token - job.submitted)
        self.metrics.generated_tokens.labels(method).inc(len(new))
        delta = job.text.add(new)
        if delta and job.request.stream:
            job.emit(delta)
        return job.text.stopped

    def _decode(self, tokens: list[int]) -> str:
        with self.tokenizer_lock:
            return self.decoder.target.tokenizer.decode(tokens, skip_special_tokens=True)

    def _finish(self, job: Job) -> None:
        g, request, method = job.generation, job.request, job.request.config.method
        if g.error is not None:
            log.error("a generation failed in its callback", exc_info=g.error)
            self._fail(job, g.error)
            return
        if job.cancelled.is_set():
            self._cancelled(job)
            return
        delta = job.text.finish()
        if delta and request.stream:
            job.emit(delta)
        finish = "stop" if job.text.stopped or g.stop == "eos" else "length"
        stats = self._stats(request.config, g, job.text.stopped, job.admitted - job.submitted,
                            time.perf_counter() - job.admitted)
        self.metrics.generations.labels(method, finish).inc()
        if stats["tau"] is not None:
            self.metrics.tau.labels(method).observe(stats["tau"])
        job.emit(Outcome(job.text.text, finish, len(request.prompt_ids), job.text.completion_tokens, stats,
                         job.text.tokens[:job.text.completion_tokens]))

    def _cancelled(self, job: Job) -> None:
        self.metrics.generations.labels(job.request.config.method, "cancelled").inc()

    def _fail(self, job: Job, error: BaseException) -> None:
        self.metrics.generations.labels(job.request.config.method, "error").inc()
        job.emit(Failure(f"the generation failed ({type(error).__name__}: {error})"))

    @staticmethod
    def _stats(config: DecodeConfig, g: Generation, stop_sequence: bool, queue_seconds: float,
               seconds: float) -> dict:
        """The response's `treeflash` object. tau as `DecodeResult.tau` defines it (a round cut short by a
        stop sequence counts what it committed)."""
        tau = g.result().tau
        return {
            "method": config.method,
            "budget": g.budget,
            "lookup": g.lookup,
            "rounds": len(g.acceptance),
            "tau": None if math.isnan(tau) else tau,
            "seed": config.seed,
            "stop_reason": "stop_sequence" if stop_sequence else g.stop,  # or "eos", "max_new_tokens", "context"
            "queue_seconds": queue_seconds,  # from arrival to joining the batch
            "seconds": seconds,  # from joining the batch to the end, shared with the rounds' other requests
        }
