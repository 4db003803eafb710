"""A small client for OpenAI-compatible completion servers (vLLM, SGLang, `treeflash serve`), for
regeneration: bounded concurrency, retries with backoff, no dependency beyond the standard library.

Token ids. Prompts go out as token ids (the `/v1/completions` `prompt` may be an array of ids in all three
servers), so the server sees exactly the templated prompt. Responses come back as token ids when the server
returns them (`return_token_ids`: vLLM and `treeflash serve`); otherwise the text is re-tokenised with the
target's tokenizer (`add_special_tokens=False`) and the end-of-sequence token appended when the server
stopped at it. A re-tokenised response is checked to decode back to the same text, and the ones that do not
are counted (`Completion.round_trip`), since their ids may differ from the ones the target produced.
"""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from ..errors import TreeFlashError

RETRY_STATUSES = (408, 429, 500, 502, 503, 504)  # worth another try: busy or briefly broken


@dataclasses.dataclass
class Completion:
    token_ids: list[int]  # the response as the target would see it
    finish_reason: str | None
    from_server: bool  # the server returned the ids (else they were re-tokenised from the text)
    round_trip: bool  # the ids decode to the server's text (always True for ids from the server)


class CompletionClient:
    """POST /v1/completions with token-id prompts; see the module docstring."""

    def __init__(self, url: str, model: str | None = None, concurrency: int = 8, retries: int = 5,
                 timeout: float = 600.0, backoff: float = 1.0):
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise TreeFlashError(f"--server must be an http(s) URL like http://127.0.0.1:8000; got {url!r}")
        if concurrency < 1 or retries < 0:
            raise TreeFlashError("concurrency must be >= 1 and retries >= 0")
        self.base = url.rstrip("/").removesuffix("/v1")
        self.concurrency, self.retries, self.timeout, self.backoff = concurrency, retries, timeout, backoff
        self.model = model or self._first_model()

    def _request(self, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Authorization": "Bearer unused"}
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.base + path, data=data, headers=headers,
                                             method="GET" if body is None else "POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:300]
                if e.code not in RETRY_STATUSES or attempt == self.retries:
                    raise TreeFlashError(f"the server at {self.base} answered {path} with HTTP {e.code} ({detail}); "
                                         "check the server and the request settings") from None
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                if attempt == self.retries:
                    raise TreeFlashError(f"cannot reach the server at {self.base} ({e}) after {self.retries + 1} "
                                         "tries; start it or fix --server, then rerun (the run resumes)") from None
            time.sleep(self.backoff * 2 ** attempt)
        raise AssertionError("unreachable")

    def _first_model(self) -> str:
        models = self._request("/v1/models").get("data") or []
        if not models:
            raise TreeFlashError(f"the server at {self.base} lists no model; pass --server-model")
        return models[0]["id"]

    def complete(self, prompt_ids: list[int], max_tokens: int, temperature: float, seed: int | None,
                 tokenizer, eos_token_id: int | None) -> Completion:
        body = {"model": self.model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": temperature,
                "return_token_ids": True}
        if seed is not None:
            body["seed"] = seed
        choice = self._request("/v1/completions", body)["choices"][0]
        finish = choice.get("finish_reason")
        if isinstance(choice.get("token_ids"), list):
            return Completion([int(t) for t in choice["token_ids"]], finish, True, True)
        text = choice.get("text") or ""
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        round_trip = tokenizer.decode(ids, skip_special_tokens=True) == text
        if finish == "stop" and eos_token_id is not None:
            ids.append(eos_token_id)
        return Completion(ids, finish, False, round_trip)

    def complete_all(self, prompts: list[list[int]], **kwargs) -> list[Completion]:
        """`complete` for each prompt, `concurrency` at a time, in order."""
        seeds = kwargs.pop("seeds", None) or [None] * len(prompts)
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda ps: self.complete(ps[0], seed=ps[1], **kwargs), zip(prompts, seeds)))
