"""The model seam: one streaming call to the Anthropic Messages API, with errors classified once."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    import anthropic

logger = logging.getLogger(__name__)

Json = dict[str, Any]
TextCallback = Callable[[int, str], Awaitable[None]]
"""Receives (content block index, text delta) while the model streams."""

ErrorKind = Literal[
    "model_overloaded_error",
    "model_rate_limited_error",
    "model_request_failed_error",
    "billing_error",
]


@dataclass(frozen=True, slots=True)
class ModelResponse:
    """A finished assistant message."""

    content: list[Json]
    stop_reason: str
    usage: Json
    model: str
    stop_details: Json | None = None


class ModelError(Exception):
    """A failed model request, classified for the session's `session.error` event."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        retryable: bool,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after


class ModelClient(Protocol):
    """Sends one Messages API request and returns the whole reply."""

    async def create_message(
        self, request: Json, *, on_text: TextCallback | None = None
    ) -> ModelResponse:
        """Stream `request` (the Messages API body, without `stream`) to completion.

        Raises:
            ModelError: the request failed; `retryable` says whether trying again may help.
        """
        ...

    async def aclose(self) -> None: ...


class AnthropicModelClient:
    """`ModelClient` over `anthropic.AsyncAnthropic` (imported on first use: it is slow to load).

    The SDK reads `ANTHROPIC_API_KEY` and `ANTHROPIC_BASE_URL`; retries are ours, not the SDK's,
    so that every attempt is visible as an event.
    """

    def __init__(self, *, api_key: str | None = None, base_url: str | None = None) -> None:
        self._api_key = api_key
        self._base_url = base_url
        self._client: anthropic.AsyncAnthropic | None = None

    def _get(self) -> anthropic.AsyncAnthropic:
        if self._client is None:
            import anthropic

            kwargs: Json = {"max_retries": 0}
            if self._api_key:
                kwargs["api_key"] = self._api_key
            if self._base_url:
                kwargs["base_url"] = self._base_url
            self._client = anthropic.AsyncAnthropic(**kwargs)
        return self._client

    async def create_message(
        self, request: Json, *, on_text: TextCallback | None = None
    ) -> ModelResponse:
        import anthropic

        try:
            client = self._get()
        except anthropic.AnthropicError as exc:
            raise ModelError(
                "model_request_failed_error",
                f"the Anthropic client could not be created: {exc}. Set ANTHROPIC_API_KEY",
                retryable=False,
            ) from exc
        try:
            async with client.messages.stream(**request) as stream:
                async for event in stream:
                    if (
                        on_text is not None
                        and event.type == "content_block_delta"
                        and event.delta.type == "text_delta"
                    ):
                        await on_text(event.index, event.delta.text)
                message = await stream.get_final_message()
        except anthropic.APIStatusError as exc:
            raise _classify_status(exc) from exc
        except anthropic.APITimeoutError as exc:
            raise ModelError(
                "model_request_failed_error", "the model request timed out", retryable=True
            ) from exc
        except anthropic.APIConnectionError as exc:
            raise ModelError(
                "model_request_failed_error",
                f"could not reach the Messages API: {exc}",
                retryable=True,
            ) from exc
        data = message.model_dump(mode="json", exclude_none=True)
        return ModelResponse(
            content=list(data.get("content") or []),
            stop_reason=str(data.get("stop_reason") or "end_turn"),
            usage=dict(data.get("usage") or {}),
            model=str(data.get("model") or request.get("model")),
            stop_details=data.get("stop_details"),
        )

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()


def _classify_status(exc: anthropic.APIStatusError) -> ModelError:
    """Map an HTTP (or mid-stream) API error to the session error types."""
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error") if isinstance(body.get("error"), dict) else body
    error_type = str((error or {}).get("type") or "")
    message = str((error or {}).get("message") or exc.message)
    status = exc.status_code
    retry_after: float | None = None
    header = exc.response.headers.get("retry-after") if exc.response is not None else None
    if header:
        try:
            retry_after = float(header)
        except ValueError:
            retry_after = None
    # A mid-stream error arrives with the stream's HTTP status (200): trust the error type.
    if error_type == "overloaded_error" or status == 529:
        return ModelError("model_overloaded_error", message, True, status, retry_after)
    if error_type == "rate_limit_error" or status == 429:
        return ModelError("model_rate_limited_error", message, True, status, retry_after)
    if error_type in ("billing_error",) or status == 402:
        return ModelError("billing_error", message, False, status)
    if status >= 500 or error_type == "api_error":
        return ModelError("model_request_failed_error", message, True, status, retry_after)
    return ModelError(
        "model_request_failed_error", f"{error_type or status}: {message}", False, status
    )
