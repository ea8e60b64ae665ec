"""One request's choices (n per prompt): each runs as its own engine request, and together they are
written as one OpenAI response or one stream of SSE chunks.

Every choice is pumped by its own task into one queue. Before a response starts, each choice must
have produced its first token (or failed), so a bad adapter or a full queue still gets its 4xx status
instead of an error inside a 200 stream. Leaving early (a stop string, a client that went away, an
error in a sibling choice) aborts the engine requests still running.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from .text import TextStream
from .types import ParamError, SamplingParams, TokenOutput


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (the server's side; the engine has its own max_len and queue)."""

    max_prompt_tokens: int | None = _f(
        None, "the longest prompt in tokens (null: what the engine's max_len allows)"
    )
    max_tokens: int | None = _f(
        None, "the most tokens a request may ask for (null: what fits in the engine's max_len)"
    )
    default_max_tokens: int = _f(16, "max_tokens of a /v1/completions request that gives none (as in OpenAI)")
    max_n: int = _f(8, "the most choices (n) per request")
    max_prompts: int = _f(16, "the most prompts in one /v1/completions request")


def plan_max_tokens(
    prompt_len: int, asked: int | None, max_len: int, limits: Limits, *, default: int | None = None
) -> int:
    """The max_tokens to run with: what was asked (checked against the limits and the context), else
    `default` or what fits. A prompt too long for the server is refused here."""
    longest = min(limits.max_prompt_tokens or max_len - 1, max_len - 1)
    if prompt_len > longest:
        raise ParamError(f"the prompt has {prompt_len} tokens; this server takes at most {longest}", "prompt")
    if prompt_len == 0:
        raise ParamError("the prompt is empty; give at least one token", "prompt")
    room = max_len - prompt_len
    cap = min(room, limits.max_tokens or room)
    if asked is None:
        return min(cap, default or cap)
    if limits.max_tokens is not None and asked > limits.max_tokens:
        raise ParamError(f"max_tokens must be at most {limits.max_tokens}, got {asked}", "max_tokens")
    if asked > room:
        raise ParamError(
            f"This model's maximum context length is {max_len} tokens. However, you requested "
            f"{prompt_len + asked} tokens ({prompt_len} in the prompt, {asked} in the completion).",
            "max_tokens",
        )
    return asked


@dataclass
class Choice:
    """One sequence to generate, and what it produced."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    stops: tuple[str, ...] = ()
    text: str = ""
    count: int = 0  # tokens the engine generated (usage counts these, the end-of-sequence token too)
    tokens: list[TokenOutput] = field(default_factory=list)  # those with text (for logprobs)
    finish_reason: str | None = None
    first_at: float | None = None  # time.perf_counter() of its first token


@dataclass(frozen=True)
class _Event:
    choice: Choice
    delta: str
    token: TokenOutput | None  # None for a token that is not shown (end of sequence)
    finish_reason: str | None


@dataclass(frozen=True)
class _End:
    choice: Choice


class Fanout:
    """The choices of one request, run concurrently through the engine."""

    def __init__(
        self,
        engine: Any,
        tokenizer: Any,
        key: str | None,
        choices: list[Choice],
        prefix: str,
        *,
        tenant: str = "",
    ) -> None:
        self.engine, self.tokenizer, self.key, self.choices = engine, tokenizer, key, choices
        self.tenant = tenant  # the metrics' tenant label ("" when the server has no tenants)
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.started = time.perf_counter()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.buffer: list[Any] = []
        self.tasks: list[asyncio.Task] = []
        self.ended = 0

    async def start(self) -> None:
        """Start every choice and wait for each one's first token; the first error is raised (and the
        other choices are aborted)."""
        self.tasks = [asyncio.create_task(self._pump(c)) for c in self.choices]
        heard: set[int] = set()
        while len(heard) < len(self.choices):
            item = await self.queue.get()
            if isinstance(item, BaseException):
                await self.close()
                raise item
            heard.add(item.choice.index)
            self.buffer.append(item)

    async def _items(self) -> AsyncIterator[_Event]:
        """Every event after start(), in arrival order, until each choice ended; errors are raised."""
        pending, self.buffer = self.buffer, []
        while self.ended < len(self.choices):
            item = pending.pop(0) if pending else await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, _End):
                self.ended += 1
            else:
                yield item

    async def wait(self) -> None:
        """Run every choice to its end."""
        try:
            async for _ in self._items():
                pass
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop every choice still running (each aborts its engine request)."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _pump(self, choice: Choice) -> None:
        # prometheus_client loads with the first request, not with every CLI command
        from .metrics import request_timer

        request_id = f"{self.id}-{choice.index}"
        text = TextStream(self.tokenizer, choice.stops)
        ends = set(self.engine.eos_ids) | set(choice.params.stop_token_ids)
        timer = request_timer(self.engine, self.key, self.tenant, len(choice.prompt_ids))
        outputs = self.engine.generate(choice.prompt_ids, self.key, choice.params, request_id)
        finished = False
        ended: str | BaseException = "abort"  # cancelled: the client left, or a sibling choice failed
        try:
            async for out in outputs:
                timer.token()
                if choice.first_at is None:
                    choice.first_at = time.perf_counter()
                choice.count += 1
                finished = out.finish_reason is not None
                hidden = out.finish_reason == "stop" and out.token_id in ends
                delta = "" if hidden else text.add(out.token_id)
                if not hidden:
                    choice.tokens.append(out)
                finish = "stop" if text.stopped else out.finish_reason
                if finish:
                    delta += text.finish()
                    choice.text, choice.finish_reason = text.text, finish
                self.queue.put_nowait(_Event(choice, delta, None if hidden else out, finish))
                if finish:
                    break
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 (handed to the request's handler)
            ended = e
            self.queue.put_nowait(e)
        finally:
            timer.end(choice.finish_reason or ended, choice.count)
            if not finished:
                self.engine.abort(request_id)
            await outputs.aclose()
            self.queue.put_nowait(_End(choice))

    # -- writing -----------------------------------------------------------------------------------
    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _logprobs(self, tokens: list[TokenOutput], chat: bool, offset: int = 0) -> dict[str, Any] | None:
        if not tokens or tokens[0].logprob is None:
            return None
        if chat:

            def entry(t: int, lp: float) -> dict[str, Any]:
                s = self._token_text(t)
                return {"token": s, "logprob": lp, "bytes": list(s.encode())}

            content = [
                {
                    **entry(t.token_id, t.logprob),
                    "top_logprobs": [entry(i, lp) for i, lp in t.top_logprobs.items()],
                }
                for t in tokens
            ]
            return {"content": content, "refusal": None}
        texts = [self._token_text(t.token_id) for t in tokens]
        offsets = []
        for s in texts:
            offsets.append(offset)
            offset += len(s)
        return {
            "tokens": texts,
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{self._token_text(i): lp for i, lp in t.top_logprobs.items()} for t in tokens],
            "text_offset": offsets,
        }

    def _usage(self, prompt_tokens: int) -> dict[str, int]:
        completion = sum(c.count for c in self.choices)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }

    def response(self, kind: str, model: str, prompt_tokens: int, chat: bool) -> dict[str, Any]:
        """The whole (non-streamed) response."""
        choices = []
        for c in self.choices:
            body: dict[str, Any] = {"index": c.index}
            if chat:
                body["message"] = {"role": "assistant", "content": c.text}
            else:
                body["text"] = c.text
            body.update(logprobs=self._logprobs(c.tokens, chat), finish_reason=c.finish_reason)
            choices.append(body)
        return {
            "id": self.id, "object": kind, "created": self.created, "model": model,
            "choices": choices, "usage": self._usage(prompt_tokens),
        }  # fmt: skip

    async def sse(
        self, kind: str, model: str, prompt_tokens: int, chat: bool, include_usage: bool
    ) -> AsyncIterator[str]:
        """The response as Server-Sent Events: one chunk per token that has text (or logprobs), the
        finish reason in each choice's last chunk, usage in a final chunk if asked, then [DONE]."""
        kind = f"{kind}.chunk" if chat else kind
        head = {"id": self.id, "object": kind, "created": self.created, "model": model}
        extra = {"usage": None} if include_usage else {}

        def chunk(choices: list[dict[str, Any]], **more: Any) -> str:
            return f"data: {json.dumps({**head, 'choices': choices, **extra, **more})}\n\n"

        offsets = {c.index: 0 for c in self.choices}  # characters streamed so far, per choice
        try:
            if chat:
                for c in self.choices:
                    delta = {"role": "assistant", "content": ""}
                    yield chunk([{"index": c.index, "delta": delta, "logprobs": None, "finish_reason": None}])
            async for ev in self._items():
                tokens = [ev.token] if ev.token is not None else []
                logprobs = self._logprobs(tokens, chat, offsets[ev.choice.index])
                if not ev.delta and logprobs is None and ev.finish_reason is None:
                    continue
                offsets[ev.choice.index] += len(ev.delta)
                body: dict[str, Any] = {"index": ev.choice.index}
                body.update({"delta": {"content": ev.delta}} if chat else {"text": ev.delta})
                body.update(logprobs=logprobs, finish_reason=ev.finish_reason)
                yield chunk([body])
            if include_usage:
                yield chunk([], usage=self._usage(prompt_tokens))
        except Exception as e:  # noqa: BLE001 (the status is sent: the error goes in the stream)
            from .apierrors import as_api_error

            yield f"data: {json.dumps(as_api_error(e).body())}\n\n"
        finally:
            await self.close()
        yield "data: [DONE]\n\n"
