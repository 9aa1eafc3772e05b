"""One streaming request against an OpenAI-compatible server, timed chunk by chunk.

Timeline of one request (perf_counter seconds; `|` marks an SSE chunk that carries text):

    start       first text           ...               last text        end of stream
      |-----TTFT-----|---ITL[0]---|---ITL[1]---| ... |------|-------------|
      |<-------------------------------- E2EL (latency) ------------------>|

An inter-token latency is counted per SSE chunk that carries text (a server that sends two
tokens in a chunk shows one longer gap), and output tokens come from the server's `usage`
(stream_options.include_usage) when it sends it, else from the number of text chunks.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import aiohttp

from zeroserve.launcher.bench.datasets import BenchRequest, messages_to_text

ENDPOINT_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass
class RequestResult:
    success: bool = False
    # Error type when not success: http_<status>, stream_broken, stream_error, bad_chunk,
    # timeout, connection, empty_response.
    error: str | None = None
    error_detail: str = ""
    status: int | None = None
    start: float = 0.0  # perf_counter when the request was sent
    ttft: float = 0.0  # seconds to the first chunk with text
    latency: float = 0.0  # seconds to the end of the stream (E2EL)
    itl: list[float] = field(default_factory=list)  # gaps between text chunks, seconds
    prompt_tokens: int | None = None  # from the server's usage
    output_tokens: int = 0
    usage_reported: bool = False
    text_chunks: int = 0
    text: str = ""
    expected_prompt_len: int = 0
    expected_output_len: int = 0


class SSEParser:
    """Incremental Server-Sent Events parser: feed bytes, get the `data` of complete events.

    Events end with a blank line; several `data:` lines in one event are joined with '\\n';
    comments (':' lines) and other fields (event, id, retry) are ignored. \\r\\n and \\n both
    end lines, and an event or a line may be split across network reads.
    """

    def __init__(self):
        self._buf = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buf += chunk
        events = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                break
            line = self._buf[:nl].rstrip(b"\r").decode("utf-8", errors="replace")
            self._buf = self._buf[nl + 1 :]
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
            elif line.startswith("data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(" ") else value)
        return events

    def close(self) -> list[str]:
        """The last event when the stream ends without its blank line."""
        events = self.feed(b"\n\n") if self._buf or self._data else []
        return events


# Fields beyond the OpenAI spec (or newer than some servers), sent unless a server refuses
# them: in probing order of what to drop first.
OPTIONAL_FIELDS = ("ignore_eos", "min_tokens", "stream_options")


def build_payload(
    endpoint: str, model: str, req: BenchRequest, fields: tuple[str, ...], temperature: float
) -> dict:
    """The JSON body: the prompt, max_tokens, streaming, plus the optional `fields` still in
    use: ignore_eos / min_tokens make outputs as long as asked, stream_options asks for usage."""
    body: dict = {"model": model, "max_tokens": req.output_len, "temperature": temperature, "stream": True}
    if endpoint == "chat":
        body["messages"] = (
            req.prompt if isinstance(req.prompt, list) else [{"role": "user", "content": req.prompt}]
        )
    else:
        body["prompt"] = req.prompt if isinstance(req.prompt, str) else messages_to_text(req.prompt)
    if "stream_options" in fields:
        body["stream_options"] = {"include_usage": True}
    if "ignore_eos" in fields:
        body["ignore_eos"] = True
    if "min_tokens" in fields:
        body["min_tokens"] = req.output_len
    body.update(req.extra)
    return body


def _chunk_text(obj: dict) -> str:
    """The generated text in one stream chunk, for completions and chat alike."""
    text = ""
    for choice in obj.get("choices") or []:
        if "text" in choice:
            text += choice.get("text") or ""
        delta = choice.get("delta") or {}
        text += (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return text


def _finished(obj: dict) -> bool:
    return any(c.get("finish_reason") for c in obj.get("choices") or [])


async def send_request(
    session: aiohttp.ClientSession, url: str, payload: dict, headers: dict, req: BenchRequest | None = None
) -> RequestResult:
    """POST the payload and time its stream. Never raises for server or network faults: they
    become `error` types on the result, so one bad request cannot stop a benchmark."""
    res = RequestResult()
    if req is not None:
        res.expected_prompt_len, res.expected_output_len = req.prompt_len, req.output_len
    res.start = last = time.perf_counter()
    done = finish_seen = False
    parts: list[str] = []
    try:
        async with session.post(url, json=payload, headers=headers) as resp:
            res.status = resp.status
            if resp.status != 200:
                res.error = f"http_{resp.status}"
                res.error_detail = (await resp.text())[:500]
                return res
            parser = SSEParser()
            async for chunk in resp.content.iter_any():
                now = time.perf_counter()
                for data in parser.feed(chunk):
                    if data.strip() == "[DONE]":
                        done = True
                        continue
                    try:
                        obj = json.loads(data)
                    except json.JSONDecodeError:
                        res.error, res.error_detail = "bad_chunk", data[:200]
                        return res
                    if not isinstance(obj, dict):
                        continue
                    if obj.get("error"):
                        res.error, res.error_detail = "stream_error", json.dumps(obj["error"])[:500]
                        return res
                    text = _chunk_text(obj)
                    if text:
                        if res.text_chunks == 0:
                            res.ttft = now - res.start
                        else:
                            res.itl.append(now - last)
                        last = now
                        res.text_chunks += 1
                        parts.append(text)
                    finish_seen = finish_seen or _finished(obj)
                    usage = obj.get("usage")
                    if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                        res.usage_reported = True
                        res.output_tokens = int(usage["completion_tokens"])
                        if usage.get("prompt_tokens") is not None:
                            res.prompt_tokens = int(usage["prompt_tokens"])
            for data in parser.close():
                done = done or data.strip() == "[DONE]"
    except TimeoutError:
        res.error, res.error_detail = "timeout", "no complete response within --request-timeout"
        return res
    except aiohttp.ClientPayloadError as e:
        res.error, res.error_detail = "stream_broken", str(e)[:500]
        return res
    except aiohttp.ServerDisconnectedError as e:
        res.error, res.error_detail = ("stream_broken" if res.status else "connection"), str(e)[:500]
        return res
    except (aiohttp.ClientError, OSError) as e:
        res.error, res.error_detail = "connection", f"{type(e).__name__}: {e}"[:500]
        return res
    res.latency = time.perf_counter() - res.start
    res.text = "".join(parts)
    if not (done or finish_seen):
        res.error, res.error_detail = "stream_broken", "the stream ended without [DONE] or a finish_reason"
        return res
    if res.text_chunks == 0 and res.output_tokens == 0:
        res.error, res.error_detail = "empty_response", "the server finished without generating any text"
        return res
    if not res.usage_reported:
        res.output_tokens = res.text_chunks
    res.success = True
    return res


async def first_model_id(session: aiohttp.ClientSession, base_url: str, headers: dict) -> str:
    """GET /v1/models -> the first id (what --model defaults to)."""
    url = base_url.rstrip("/") + "/v1/models"
    try:
        async with session.get(url, headers=headers) as resp:
            body = await resp.text()
            if resp.status != 200:
                raise RuntimeError(f"GET {url} answered {resp.status}: {body[:200]}; pass --model")
            data = json.loads(body).get("data") or []
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        raise RuntimeError(f"cannot reach {url} ({type(e).__name__}: {e}); is the server up?") from None
    except (json.JSONDecodeError, AttributeError):
        raise RuntimeError(f"GET {url} did not answer an OpenAI model list; pass --model") from None
    if not data or not isinstance(data[0], dict) or "id" not in data[0]:
        raise RuntimeError(f"GET {url} lists no model; pass --model")
    return str(data[0]["id"])
