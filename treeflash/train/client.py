"""Regeneration through an OpenAI-compatible completion server (vLLM, SGLang, `treeflash serve`), with the
`openai` client: bounded concurrency here, retries with backoff (408, 429, 5xx and lost connections) there.

Token ids. Prompts go out as token ids (the `/v1/completions` `prompt` may be an array of ids in all three
servers), so the server sees exactly the templated prompt. Responses come back as token ids when the server
returns them (`return_token_ids`: vLLM and `treeflash serve`); otherwise the text is re-tokenised with the
target's tokenizer (`add_special_tokens=False`) and the end-of-sequence token appended when the server
stopped at it. A re-tokenised response is checked to decode back to the same text, and the ones that do not
are counted (`Completion.round_trip`), since their ids may differ from the ones the target produced.
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

from ..errors import TreeFlashError


@dataclasses.dataclass
class Completion:
    token_ids: list[int]  # the response as the target would see it
    finish_reason: str | None
    from_server: bool  # the server returned the ids (else they were re-tokenised from the text)
    round_trip: bool  # the ids decode to the server's text (always True for ids from the server)


class CompletionClient:
    """POST /v1/completions with token-id prompts; see the module docstring."""

    def __init__(self, url: str, model: str | None = None, concurrency: int = 8, retries: int = 5,
                 timeout: float = 600.0):
        try:
            import openai  # optional: only `train data --server` needs it
        except ImportError:
            raise TreeFlashError("regenerating through a server needs the package openai; "
                                 "`pip install openai` (or the extra treeflash[regenerate])") from None
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise TreeFlashError(f"--server must be an http(s) URL like http://127.0.0.1:8000; got {url!r}")
        if concurrency < 1 or retries < 0:
            raise TreeFlashError("concurrency must be >= 1 and retries >= 0")
        self.base = url.rstrip("/").removesuffix("/v1")
        self.concurrency = concurrency
        self._errors = (openai.APIStatusError, openai.APIConnectionError)
        self._client = openai.OpenAI(base_url=self.base + "/v1", api_key="unused", max_retries=retries,
                                     timeout=timeout)
        self.model = model or self._first_model()

    def _call(self, what: str, call):
        try:
            return call()
        except self._errors as e:
            status = getattr(e, "status_code", None)
            if status is not None:
                raise TreeFlashError(f"the server at {self.base} answered {what} with HTTP {status} ({e.message}); "
                                     "check the server and the request settings") from None
            raise TreeFlashError(f"cannot reach the server at {self.base} ({e}) after its retries; start it or fix "
                                 "--server, then rerun (the run resumes)") from None

    def _first_model(self) -> str:
        models = self._call("/v1/models", lambda: self._client.models.list().data)
        if not models:
            raise TreeFlashError(f"the server at {self.base} lists no model; pass --server-model")
        return models[0].id

    def complete(self, prompt_ids: list[int], max_tokens: int, temperature: float, seed: int | None,
                 tokenizer, eos_token_id: int | None) -> Completion:
        extra = {} if seed is None else {"seed": seed}
        reply = self._call("/v1/completions", lambda: self._client.completions.create(
            model=self.model, prompt=prompt_ids, max_tokens=max_tokens, temperature=temperature,
            extra_body={"return_token_ids": True}, **extra))
        choice = reply.choices[0].to_dict()  # keeps fields the OpenAI schema lacks (token_ids)
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
