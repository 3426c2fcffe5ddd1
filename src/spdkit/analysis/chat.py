"""A client for any OpenAI-compatible chat endpoint (`POST {url}/chat/completions`): a local
server or a hosted API, for `spdkit label`.

Requests are sent one at a time, at most one per `min_interval` seconds (rate limit), and
retried with exponential back-off on connection errors, timeouts, 429 and 5xx answers; any
other failure, or running out of retries, is an EndpointError in one line (URL and reason).
Temperature 0, so a label is as repeatable as the server makes it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import httpx

RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class EndpointError(ValueError):
    """The endpoint cannot be reached or answers with an error (one line)."""


@dataclass
class ChatEndpoint:
    """url: the API base (…/v1); model: the name the server knows; api_key: sent as a bearer
    token when given."""

    url: str
    model: str
    api_key: str | None = None
    retries: int = 4
    min_interval: float = 0.0
    timeout: float = 120.0
    backoff: float = 1.0
    requests: int = field(default=0, init=False)  # sent, retries included
    _last: float = field(default=0.0, init=False, repr=False)

    def complete(self, prompt: str, max_tokens: int = 64) -> str:
        """The assistant's answer to one user message."""
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": max_tokens,
        }
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        endpoint = self.url.rstrip("/") + "/chat/completions"
        reason = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            wait = self._last + self.min_interval - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self._last = time.monotonic()
            self.requests += 1
            try:
                response = httpx.post(endpoint, json=body, headers=headers, timeout=self.timeout)
            except httpx.HTTPError as err:
                reason = f"{type(err).__name__}: {err}"
                continue
            if response.status_code in RETRY_STATUS:
                reason = f"HTTP {response.status_code}"
                continue
            if response.status_code != 200:
                raise EndpointError(
                    f"{endpoint}: HTTP {response.status_code}: {response.text[:200]!r}"
                )
            try:
                return str(response.json()["choices"][0]["message"]["content"])
            except (ValueError, KeyError, IndexError, TypeError):
                raise EndpointError(
                    f"{endpoint}: not an OpenAI chat completion: {response.text[:200]!r}"
                ) from None
        raise EndpointError(f"{endpoint}: no answer after {self.retries + 1} tries ({reason})")
