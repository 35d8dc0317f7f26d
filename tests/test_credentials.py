"""Keys and tokens never leak (issue 30): every path strips a key's outer whitespace, refuses
one a header cannot carry before any request, and no log record (httpx's and httpcore's
included, at DEBUG) or exception (message, args, repr, chain) shows a key or a URL's
credentials.

The upstream is the project's own ``serve`` of the tiny model, requiring the key as its bearer
token; faults that would quote a key are injected into httpx's transport.
"""

from __future__ import annotations

import logging
import socket
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import RunningServer

from embeddingcache import EmbeddingCache, get_embeddings, openai_client
from embeddingcache.credentials import clean, clean_cause, mask
from embeddingcache.errors import (
    AllProvidersFailedError,
    EmbeddingCacheError,
    InvalidInputError,
    InvalidInputTypeError,
)
from embeddingcache.server import Backend

KEY = "sk-test-keys-never-leak-4242"
TOKEN = "tok-backend-never-leak-4242"
USER = "keyuser-4242"
# A key with a character a header cannot carry: each side of it must not show either.
INNER_NEWLINE = KEY[:14] + "\n" + KEY[14:]
NON_ASCII = KEY[:14] + "é" + KEY[14:]
SECRETS = (KEY, TOKEN, USER, KEY[:14], KEY[14:], TOKEN[:14], TOKEN[14:])
TEXTS = ["a key travels in a header", "and nowhere else"]


@dataclass
class Ctx:
    """What a case needs: the upstream (serve requiring ``KEY``), its backend, the model."""

    upstream: RunningServer
    backend: Backend
    model: str
    folder: Path
    start_server: Callable[..., tuple[RunningServer, Any]]
    monkeypatch: pytest.MonkeyPatch

    @property
    def base_url(self) -> str:
        return self.upstream.url + "/v1"

    def cache(self, **options: Any) -> EmbeddingCache:
        options.setdefault("base_url", self.base_url)
        options.setdefault("cache_dir", self.folder)
        return EmbeddingCache(remote_url=False, fallback_providers=("local",), **options)

    def expected(self) -> np.ndarray:
        """The upstream's vectors of `TEXTS`, asked with the key as it should be sent."""
        with self.cache(api_key=KEY, cache_dir=self.folder / "reference") as cache:
            return cache.get_embeddings(TEXTS, self.model)


@pytest.fixture
def ctx(
    start_server: Callable[..., tuple[RunningServer, Any]],
    tiny_model: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Ctx:
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "EMBEDDING_CACHE_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(openai_client, "WAIT_SCALE", 0.001)
    upstream, backend = start_server(token=KEY)
    return Ctx(
        upstream, backend, f"openai:{tiny_model}", tmp_path / "cache", start_server, monkeypatch
    )


# -- the cases: each returns the exception it expected, or None when it must work ------------


def works_with_a_trailing_newline_given_to_the_cache(ctx: Ctx) -> None:
    with ctx.cache(api_key=KEY + "\n") as cache:
        assert np.array_equal(cache.get_embeddings(TEXTS, ctx.model), ctx.expected())


def works_with_outer_whitespace_given_per_call(ctx: Ctx) -> None:
    with ctx.cache() as cache:
        got = cache.get_embeddings(TEXTS, ctx.model, api_key=f" {KEY}\r\n")
    assert np.array_equal(got, ctx.expected())


def works_with_a_trailing_newline_in_openai_api_key(ctx: Ctx) -> None:
    ctx.monkeypatch.setenv("OPENAI_API_KEY", KEY + "\n")
    with ctx.cache() as cache:
        assert np.array_equal(cache.get_embeddings(TEXTS, ctx.model), ctx.expected())


def works_with_a_trailing_newline_given_to_the_module_function(ctx: Ctx) -> None:
    got = get_embeddings(
        TEXTS, ctx.model, cache_dir=ctx.folder, base_url=ctx.base_url, api_key=KEY + "\n"
    )
    assert np.array_equal(got, ctx.expected())


def works_with_a_trailing_newline_in_the_token_on_both_sides(ctx: Ctx) -> None:
    server, _ = ctx.start_server(token=TOKEN + "\n")
    ctx.monkeypatch.setenv("EMBEDDING_CACHE_TOKEN", TOKEN + "\n")
    with EmbeddingCache(
        ctx.backend.default_model,
        cache_dir=ctx.folder,
        remote_url=server.url,
        fallback_providers=("remote",),
    ) as cache:
        assert cache.get_embeddings(TEXTS).shape == (2, 32)
        assert cache.stats["remote_computed"] == 2


def refuses_a_control_character_inside_the_key(ctx: Ctx) -> BaseException:
    with pytest.raises(InvalidInputError, match="a control character at position 14") as got:
        ctx.cache(api_key=INNER_NEWLINE)
    return got.value


def refuses_a_non_ascii_key_per_call_from_the_librarys_tree(ctx: Ctx) -> BaseException:
    with ctx.cache() as cache, pytest.raises(EmbeddingCacheError, match="non-ASCII") as got:
        cache.get_embeddings(TEXTS, ctx.model, api_key=NON_ASCII)
    assert isinstance(got.value, InvalidInputError)
    return got.value


def refuses_a_non_ascii_openai_api_key(ctx: Ctx) -> BaseException:
    ctx.monkeypatch.setenv("OPENAI_API_KEY", NON_ASCII)
    with ctx.cache() as cache, pytest.raises(InvalidInputError, match="OPENAI_API_KEY") as got:
        cache.get_embeddings(TEXTS, ctx.model)
    return got.value


def refuses_a_non_ascii_token(ctx: Ctx) -> BaseException:
    with pytest.raises(InvalidInputError, match="token holds a non-ASCII") as got:
        EmbeddingCache(cache_dir=ctx.folder, remote_url=ctx.upstream.url, token=NON_ASCII)
    return got.value


def refuses_a_control_character_in_the_servers_token(ctx: Ctx) -> BaseException:
    with pytest.raises(InvalidInputError, match="token holds a control") as got:
        Backend(ctx.backend.cache, token=TOKEN[:14] + "\x00" + TOKEN[14:])
    return got.value


def refuses_credentials_in_the_endpoint_of_a_models_name(ctx: Ctx) -> BaseException:
    port = ctx.upstream.url.rsplit(":", 1)[1]
    name = f"openai:m;endpoint=http://{USER}:{KEY}@127.0.0.1:{port}/v1"
    with ctx.cache() as cache, pytest.raises(InvalidInputError, match="credentials") as got:
        cache.get_embeddings(TEXTS, name)
    return got.value


def refuses_credentials_in_base_url_pointing_to_api_key(ctx: Ctx) -> BaseException:
    url = ctx.base_url.replace("http://", f"http://{USER}:{KEY}@")
    with pytest.raises(InvalidInputError, match="api_key=") as got:
        ctx.cache(base_url=url)
    return got.value


def refuses_credentials_in_openai_base_url(ctx: Ctx) -> BaseException:
    ctx.monkeypatch.setenv("OPENAI_BASE_URL", ctx.base_url.replace("//", f"//{USER}:{KEY}@"))
    with pytest.raises(InvalidInputError, match="credentials") as got:
        EmbeddingCache(ctx.model, cache_dir=ctx.folder).get_embeddings(TEXTS)
    return got.value


def fails_once_when_httpx_cannot_write_the_request_and_quotes_the_key(
    ctx: Ctx,
) -> BaseException:
    """h11's words for a header it refuses, injected: one attempt, the key masked."""
    sent: list[httpx.Request] = []

    def refuse(self: httpx.HTTPTransport, request: httpx.Request) -> httpx.Response:
        sent.append(request)
        raise httpx.LocalProtocolError(f"Illegal header value b'Bearer {KEY}\\n'")

    with ctx.cache(api_key=KEY) as cache:
        ctx.monkeypatch.setattr(httpx.HTTPTransport, "handle_request", refuse)
        with pytest.raises(AllProvidersFailedError, match="could not be sent") as got:
            cache.get_embeddings(TEXTS, ctx.model)
    # The texts' request was sent once: never retried (the version probes before it are
    # requests of their own).
    assert len([r for r in sent if TEXTS[0].encode() in r.read()]) == 1
    return got.value


def fails_on_a_refusal_that_echoes_the_key(ctx: Ctx) -> BaseException:
    def echo(self: httpx.HTTPTransport, request: httpx.Request) -> httpx.Response:
        said = {"error": {"message": f"Incorrect API key provided: {KEY}"}}
        return httpx.Response(401, json=said, request=request)

    ctx.monkeypatch.setattr(httpx.HTTPTransport, "handle_request", echo)
    with ctx.cache(api_key=KEY) as cache, pytest.raises(AllProvidersFailedError) as got:
        cache.get_embeddings(TEXTS, ctx.model)
    assert "HTTP 401: Incorrect API key provided: ***" in str(got.value)
    return got.value


def fails_after_retries_logged_against_a_closed_port(ctx: Ctx) -> BaseException:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with ctx.cache(api_key=KEY, base_url=f"http://127.0.0.1:{port}/v1") as cache:
        with pytest.raises(AllProvidersFailedError, match="no answer") as got:
            cache.get_embeddings(TEXTS, ctx.model)
    return got.value


def fails_over_from_a_backend_whose_error_quotes_the_token(ctx: Ctx) -> None:
    """A backend that cannot be reached is skipped (logged), and the model computes."""

    def refuse(self: httpx.HTTPTransport, request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"refused {request.headers['authorization']}")

    ctx.monkeypatch.setattr(httpx.HTTPTransport, "handle_request", refuse)
    url = ctx.upstream.url.replace("http://", f"http://{USER}:{KEY}@")
    with EmbeddingCache(
        ctx.backend.default_model, cache_dir=ctx.folder, remote_url=url, token=TOKEN
    ) as cache:
        assert cache.get_embeddings(TEXTS).shape == (2, 32)
        assert cache.stats["computed"] == 2


CASES = [
    works_with_a_trailing_newline_given_to_the_cache,
    works_with_outer_whitespace_given_per_call,
    works_with_a_trailing_newline_in_openai_api_key,
    works_with_a_trailing_newline_given_to_the_module_function,
    works_with_a_trailing_newline_in_the_token_on_both_sides,
    refuses_a_control_character_inside_the_key,
    refuses_a_non_ascii_key_per_call_from_the_librarys_tree,
    refuses_a_non_ascii_openai_api_key,
    refuses_a_non_ascii_token,
    refuses_a_control_character_in_the_servers_token,
    refuses_credentials_in_the_endpoint_of_a_models_name,
    refuses_credentials_in_base_url_pointing_to_api_key,
    refuses_credentials_in_openai_base_url,
    fails_once_when_httpx_cannot_write_the_request_and_quotes_the_key,
    fails_on_a_refusal_that_echoes_the_key,
    fails_after_retries_logged_against_a_closed_port,
    fails_over_from_a_backend_whose_error_quotes_the_token,
]


def _shown(error: BaseException) -> Iterator[str]:
    """Everything an exception shows: its message, args and repr, and those of each
    exception it chains to, and the traceback a user would read."""
    yield "".join(traceback.format_exception(error))
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield from (str(current), repr(current), repr(current.args))
        pending += [current.__cause__, current.__context__]


@pytest.mark.parametrize("case", CASES, ids=[case.__name__ for case in CASES])
def test_no_log_record_or_exception_shows_a_key_a_token_or_url_credentials(
    ctx: Ctx, case: Callable[[Ctx], BaseException | None], caplog: pytest.LogCaptureFixture
) -> None:
    """Each path works with the key stripped or fails with one library error; nothing shows it."""
    for name in ("", "httpx", "httpcore", "embeddingcache"):
        caplog.set_level(logging.DEBUG, logger=name or None)
    asked = ctx.backend.stats()["requests"]
    error = case(ctx)
    formatter = logging.Formatter()
    logged = [formatter.format(record) + repr(record.args) for record in caplog.records]
    shown = [*logged, *(_shown(error) if error is not None else ())]
    assert not [(secret, text) for text in shown for secret in SECRETS if secret in text]
    if case.__name__.startswith("works"):
        # The capture works: httpcore's DEBUG records of the requests were searched.
        assert any(record.name.startswith("httpcore") for record in caplog.records)
    if case.__name__.startswith("refuses"):
        assert ctx.backend.stats()["requests"] == asked  # refused before any request
    if case is fails_after_retries_logged_against_a_closed_port:
        assert [m for m in logged if "retrying after attempt" in m]


# -- the helpers themselves ----------------------------------------------------------------


def test_clean_strips_outer_whitespace_and_keeps_an_empty_key_empty() -> None:
    """Whitespace around a key goes and inside it stays; a blank key is "" (none); bytes fail."""
    assert clean("\t sk-a b\r\n", "api_key") == "sk-a b"
    assert clean("  ", "api_key") == "" and clean(None, "api_key") is None
    with pytest.raises(InvalidInputTypeError, match="api_key must be a str"):
        clean(b"sk-bytes", "api_key")  # type: ignore[arg-type]


def test_mask_hides_secrets_and_the_credentials_and_query_of_urls() -> None:
    """Secrets shorter than four characters are left alone: they would mask ordinary words."""
    said = f"at http://{USER}:pw@h:1/v1?api-key={KEY}#f: Bearer {TOKEN}"
    assert mask(said, [TOKEN, None, "ab"]) == "at http://***@h:1/v1?***#f: Bearer ***"


def test_a_foreign_error_is_kept_as_a_cause_only_when_it_shows_no_secret() -> None:
    """An exception chained to the foreign one counts: it would show in the traceback."""
    clean_error = httpx.ConnectError("[Errno 111] Connection refused")
    assert clean_cause(clean_error, [KEY]) is clean_error
    dirty = httpx.ConnectError("outer")
    dirty.__context__ = ValueError(f"inner {KEY}")
    assert clean_cause(dirty, [KEY]) is None  # an exception it chains to shows the key
