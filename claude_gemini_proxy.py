"""Run Anthropic Messages API clients (Claude Code, the anthropic SDK) on Google Gemini.

One file, standard library only, Python 3.9+.  The proxy speaks the Anthropic Messages API
to its clients and the Gemini REST API (v1beta) upstream.

Run:   GEMINI_API_KEY=... python3 claude_gemini_proxy.py      (listens on 127.0.0.1:8318)
Check: GEMINI_API_KEY=... python3 claude_gemini_proxy.py --check   (tests the set-up, then exits)
Use:   ANTHROPIC_BASE_URL=http://127.0.0.1:8318 ANTHROPIC_API_KEY=anything claude
Test:  python3 -m pip install pytest && python3 -m pytest -q

Environment (command-line flags beat the environment, which beats a ./.env file):
  GEMINI_API_KEY        required; several keys, comma-separated, are used in turn
  GEMINI_API_BASE       https://generativelanguage.googleapis.com/v1beta (any gateway)
  GEMINI_AUTH_TYPE      unset: x-goog-api-key header; "bearer": Authorization: Bearer
  GEMINI_AUTH_COMMAND   command printing a bearer token (gcloud ...); replaces the key
  GEMINI_AUTH_TTL       3000 seconds before the token command runs again
  HOST, PORT            127.0.0.1, 8318
  PROXY_AUTH_TOKEN      when set, clients must send it (x-api-key or Bearer)
  DEFAULT_GEMINI_MODEL  gemini-3.5-flash
  MODEL_MAP             extra routing, e.g. "claude-haiku-*=gemini-3.5-flash"
  MODEL_FALLBACKS       model=fallback,... tried once on a 404, 429 or 503 for the model
  TOOL_SCHEMA_REPAIR    on; "off" lets a tool schema Gemini rejects fail the request
  MAX_OUTPUT_TOKENS     60000 (clamp for max_tokens)
  STREAM_MODE           live (relay chunks) or buffered (one upstream call, replayed)
  UPSTREAM_TIMEOUT      600 seconds to the first byte and between stream chunks
  MAX_RETRY_WAIT        30 seconds; longer upstream retry delays become a 429 at once
  PROXY_SIGNATURE_KEY   HMAC key for thought-signature carriers (default: from the API key)
  MAX_REQUEST_BYTES     33554432
  SHUTDOWN_GRACE        30 seconds for in-flight requests after SIGTERM/SIGINT
  HEADER_TIMEOUT        30 seconds for request headers; a body gets this plus 1 s per 64 KiB
  IDLE_TIMEOUT          75 seconds an idle keep-alive connection is kept
  WRITE_TIMEOUT         60 seconds a client may leave a response unread before it is cut
  MAX_CONNECTIONS       0 = derived from the file-descriptor limit; past it a fast 529
  MAX_INFLIGHT_BYTES    268435456 request bytes held at once; past it a short wait, then 529
  HTTPS_PROXY, HTTP_PROXY, NO_PROXY   egress proxy (CONNECT tunnel), as curl reads them
  SSL_CERT_FILE, SSL_CERT_DIR         CA bundle or directory for a private upstream CA
  DEBUG                 true/1 for per-request and upstream logs (secrets redacted)

Sections (grep '^# ==' for line numbers): Configuration, Errors, Signature store,
Request: shapes and validation, Request: Anthropic -> Gemini, Response: Gemini -> Anthropic,
Operators: metrics, Upstream client, Model list, Self-healing, Batches and files, HTTP handler,
Main.

Copyright (c) 2026 the claude_gemini_proxy authors.
License: MIT (see LICENSE)
"""
from __future__ import annotations

import argparse
import base64
import binascii
import calendar
import difflib
import email.parser
import fnmatch
import hashlib
import hmac
import errno
import http.client
import io
import itertools
import json
import logging
import mimetypes
import os
import random
import re
import secrets
import select
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import OrderedDict, namedtuple
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

try:
    import resource  # Unix: the file-descriptor limit MAX_CONNECTIONS derives from
except ImportError:  # pragma: no cover (Windows)
    resource = None

__version__ = "1.1.1"
__all__ = [
    "Config", "read_config", "map_model", "ProxyError", "UpstreamError", "Carried",
    "SignatureStore", "GeminiRequest", "to_gemini_request", "ResponseFold", "Metrics",
    "UpstreamClient", "UpstreamAnswer", "Cancel", "ProxyHandler", "ProxyServer", "build_server",
    "main",
]

log = logging.getLogger("claude_gemini_proxy")

# == Configuration ============================================================
# Defaults live on Config; read_config() turns flags, environment and .env text into one.

DEFAULT_API_BASE = "https://generativelanguage.googleapis.com/v1beta"
DEFAULT_MAX_TOKENS = 32768  # when a client omits max_tokens
BYPASS_SIGNATURE = "skip_thought_signature_validator"


class Config:
    """Settings, read once by read_config(); read-only. Class attributes are the defaults."""

    host = "127.0.0.1"
    port = 8318
    api_keys = ()  # several keys spread load; the first one also seeds the signature key
    api_base = DEFAULT_API_BASE  # any gateway speaking the Gemini REST API
    auth_type = ""  # "bearer" for gateways and Vertex tokens
    proxy_auth_token = ""  # empty: the proxy is open (it binds to loopback by default)
    default_model = "gemini-3.5-flash"
    model_map = ()  # ((glob, gemini model), ...), first match wins
    model_fallbacks = ()  # ((model, fallback), ...): retired and overloaded models answer anyway
    tool_schema_repair = True  # retry a tool schema Gemini rejects in a reduced form
    max_output_tokens = 60000  # clamp: larger values get a Gemini 400
    stream_mode = "live"  # "buffered" for gateways that cannot stream
    upstream_timeout = 600.0  # long thinking is normal; this is to first byte and between chunks
    connect_timeout = 10.0
    max_retry_wait = 30.0  # past this, answer 429 with retry-after instead of waiting
    max_retries = 2  # upstream 429/500/503 retries before anything reached the client
    signature_key = b""  # HMAC key of signature carriers; instances sharing it agree
    max_request_bytes = 32 * 1024 * 1024  # the Anthropic API's own limit
    ping_interval = 15.0  # SSE keep-alive when nothing was written for this long
    header_timeout = 30.0  # request line and headers; a body gets this plus 1 s per 64 KiB
    idle_timeout = 75.0  # keep-alive wait for the next request; above nginx's 60 s default
    write_timeout = 60.0  # a client that reads nothing this long loses its response
    discard_timeout = 5.0  # time spent throwing away a body the answer did not need
    max_connections = 0  # 0: derived from the file-descriptor limit (_max_connections_for)
    max_inflight_bytes = 256 * 1024 * 1024  # request bodies (and their parsed JSON) held at once
    inflight_wait = 3.0  # how long a body waits for room under max_inflight_bytes before a 529
    shutdown_grace = 30.0
    auth_command = ""  # prints a bearer token (gcloud auth print-access-token); replaces keys
    auth_ttl = 3000.0  # rerun the command after this many seconds (tokens live an hour)
    https_proxy = ""  # egress proxies, read as urllib reads HTTPS_PROXY/HTTP_PROXY/NO_PROXY
    http_proxy = ""
    no_proxy = ""
    batch_inline_bytes = 20_000_000  # Gemini's inline batch limit; larger go as a JSONL file
    debug = False

    def __init__(self, **values):
        for name, value in values.items():
            if (
                name.startswith("_")
                or not hasattr(Config, name)
                or callable(getattr(Config, name))
            ):
                raise TypeError(f"unknown setting {name!r}")
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError("Config is read-only")

    def __repr__(self) -> str:
        shown = [f"{name}={getattr(self, name)!r}" for name in REPR_FIELDS]
        shown += [f"{name}={_without_userinfo(getattr(self, name))!r}"
                  for name in ("api_base", "https_proxy", "http_proxy")]
        shown.append(f"api_keys=<{len(self.api_keys)} key(s)>")
        return f"Config({', '.join(shown)})"


# The fields repr() shows: never a key, token, command line or proxy credential.
REPR_FIELDS = ("host", "port", "auth_type", "default_model", "model_map", "model_fallbacks",
               "tool_schema_repair",
               "max_output_tokens", "stream_mode", "upstream_timeout", "connect_timeout",
               "max_retry_wait", "max_retries", "max_request_bytes", "ping_interval",
               "header_timeout", "idle_timeout", "write_timeout", "max_connections",
               "max_inflight_bytes", "shutdown_grace", "auth_ttl", "no_proxy", "debug")


def _without_userinfo(url: str) -> str:
    """Return a URL without its user:password@ part."""
    scheme, sep, rest = url.rpartition("://")
    return scheme + sep + rest.rpartition("@")[2]


def _parse_model_fallbacks(text: str) -> tuple:
    """Return ((model, fallback), ...) from "model=fallback,model=fallback"."""
    pairs = []
    for item in text.split(","):
        model, sep, fallback = (part.strip() for part in item.partition("="))
        if not item.strip():
            continue
        if not sep or not model or not fallback or model == fallback or any(
            bad in model + fallback for bad in UNSAFE_MODEL_PARTS
        ):
            raise ValueError(f"MODEL_FALLBACKS entry {item.strip()!r} is not model=other-model")
        if model in dict(pairs):
            raise ValueError(f"MODEL_FALLBACKS names {model} twice")
        pairs.append((model, fallback))
    return tuple(pairs)


def _parse_on_off(text: str) -> bool:
    """Return True for on/true/1/yes, False for off/false/0/no."""
    value = text.strip().lower()
    if value not in ("on", "true", "1", "yes", "off", "false", "0", "no"):
        raise ValueError(f"{text!r} is not on or off")
    return value in ("on", "true", "1", "yes")


ENV_OPTIONS = (
    # (env name, flag, Config field, converter, help)
    ("HOST", "--host", "host", str, "address to listen on"),
    ("PORT", "--port", "port", int, "port to listen on"),
    ("GEMINI_API_BASE", "--api-base", "api_base", str, "Gemini REST base URL (any gateway)"),
    ("GEMINI_AUTH_TYPE", None, "auth_type", str, "unset: x-goog-api-key; bearer: Authorization"),
    ("PROXY_AUTH_TOKEN", None, "proxy_auth_token", str, "token clients must send"),
    ("DEFAULT_GEMINI_MODEL", "--default-model", "default_model", str, "model for other names"),
    ("MAX_OUTPUT_TOKENS", None, "max_output_tokens", int, "clamp for max_tokens"),
    ("STREAM_MODE", "--stream-mode", "stream_mode", str, "live or buffered"),
    ("UPSTREAM_TIMEOUT", None, "upstream_timeout", float, "seconds to first byte, between chunks"),
    ("MAX_RETRY_WAIT", None, "max_retry_wait", float, "longest upstream retry delay honoured"),
    ("MAX_REQUEST_BYTES", None, "max_request_bytes", int, "largest request body accepted"),
    ("SHUTDOWN_GRACE", None, "shutdown_grace", float, "seconds in-flight work gets on SIGTERM"),
    ("HEADER_TIMEOUT", None, "header_timeout", float, "seconds for request headers (408 past)"),
    ("IDLE_TIMEOUT", None, "idle_timeout", float, "seconds an idle keep-alive connection stays"),
    ("WRITE_TIMEOUT", None, "write_timeout", float, "seconds a client may stall a response"),
    ("MAX_CONNECTIONS", None, "max_connections", int, "client connections (0: from ulimit -n)"),
    ("MAX_INFLIGHT_BYTES", None, "max_inflight_bytes", int, "request bytes held at once"),
    ("GEMINI_AUTH_COMMAND", None, "auth_command", str, "command printing a bearer token"),
    ("GEMINI_AUTH_TTL", None, "auth_ttl", float, "seconds before the token command runs again"),
    ("MODEL_FALLBACKS", None, "model_fallbacks", _parse_model_fallbacks,
     "model=fallback,...: sent once on a 404, 429 or 503"),
    ("TOOL_SCHEMA_REPAIR", None, "tool_schema_repair", _parse_on_off,
     "on/off: retry a rejected tool schema reduced"),
)


# Variables read outside ENV_OPTIONS: by read_config() itself, the ssl module and logging.
OTHER_ENV = (
    ("GEMINI_API_KEY", "required (unless GEMINI_AUTH_COMMAND): key, or k1,k2,k3 in turn"),
    ("MODEL_MAP", "glob=model,... checked after the built-in table"),
    ("PROXY_SIGNATURE_KEY", "HMAC key for signature carriers (default: derived from key)"),
    ("HTTPS_PROXY", "egress proxy for an https base (CONNECT; user:password@ allowed)"),
    ("HTTP_PROXY", "egress proxy for an http base"),
    ("NO_PROXY", "hosts that bypass the egress proxy, as curl reads them"),
    ("SSL_CERT_FILE", "CA bundle for a private upstream CA"),
    ("SSL_CERT_DIR", "directory of CA certificates"),
    ("DEBUG", "true/1: log each request and upstream call"),
)


def _parse_dotenv(text: str) -> dict:
    """Return the KEY=VALUE pairs of .env text (# comments, optional quotes, optional export)."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip()
        if key.startswith("export "):
            key = key[7:].strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        values[key] = value
    return values


def _parse_model_map(text: str) -> tuple:
    """Return ((glob, model), ...) from "pattern=model,pattern=model"."""
    rules = []
    for item in text.split(","):
        pattern, sep, model = item.partition("=")
        if item.strip() and (not sep or not pattern.strip() or not model.strip()):
            raise ValueError(f"MODEL_MAP entry {item.strip()!r} is not pattern=model")
        if sep:
            rules.append((pattern.strip(), model.strip()))
    return tuple(rules)


def _shown_default(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "unset" if value in ((), "") else repr(value)


def _build_arg_parser() -> argparse.ArgumentParser:
    """Return the command-line parser; its help lists every option and variable."""
    defaults = Config()
    epilog = ["environment variables (flags beat them; they beat ./.env):"]
    for env, _flag, name, _conv, text in ENV_OPTIONS:
        epilog.append(f"  {env:<21} {text} (default: {_shown_default(getattr(defaults, name))})")
    epilog += [f"  {env:<21} {text}" for env, text in OTHER_ENV]
    epilog += ["", "example:  GEMINI_API_KEY=... python3 claude_gemini_proxy.py --port 8318"]
    parser = argparse.ArgumentParser(
        prog="claude_gemini_proxy.py",
        description="Serve the Anthropic Messages API on top of Google Gemini.",
        epilog="\n".join(epilog), formatter_class=argparse.RawDescriptionHelpFormatter)
    for env, flag, name, conv, text in ENV_OPTIONS:
        if flag:
            parser.add_argument(flag, dest=name, type=conv, default=None,
                                help=f"{text} (env {env}; default {getattr(defaults, name)})")
    parser.add_argument("--env-file", default=None, help="read KEY=VALUE lines (default ./.env)")
    parser.add_argument(
        "--debug", action="store_true", default=None, help="verbose logs (env DEBUG)"
    )
    parser.add_argument("--check", action="store_true", default=False,
                        help="check keys, base URL and models, print Claude Code's settings, exit")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def read_config(argv: list | None, environ: dict, dotenv_text: str = "") -> Config:
    """Return the Config for flags, environment and .env text; raise ValueError when unusable."""
    args = _build_arg_parser().parse_args(argv)
    env = _parse_dotenv(dotenv_text)
    env.update(environ)
    values = _option_values(args, env)
    keys = tuple(k.strip() for k in env.get("GEMINI_API_KEY", "").split(",") if k.strip())
    if values.get("auth_command"):
        values["auth_type"] = "bearer"
    elif not keys:
        raise ValueError("GEMINI_API_KEY is not set: run `GEMINI_API_KEY=your-key python3 "
                         "claude_gemini_proxy.py` or put GEMINI_API_KEY=... in .env")
    values["auth_type"] = values.get("auth_type", "").lower()
    if values["auth_type"] not in ("", "bearer"):
        raise ValueError("GEMINI_AUTH_TYPE must be unset or 'bearer'")
    if values.get("stream_mode", "live") not in ("live", "buffered"):
        raise ValueError("STREAM_MODE must be 'live' or 'buffered'")
    if not re.match(r"^https?://[^/]+", values.get("api_base", DEFAULT_API_BASE)):
        raise ValueError("GEMINI_API_BASE must be an http:// or https:// URL")
    debug = args.debug or env.get("DEBUG", "").lower() in ("1", "true", "yes")
    for name in ("https_proxy", "http_proxy", "no_proxy"):
        values[name] = env.get(name.upper()) or env.get(name) or ""
    signature_key = _signature_key(env.get("PROXY_SIGNATURE_KEY", ""),
                                   keys[0] if keys else values["auth_command"])
    return Config(api_keys=keys, model_map=_parse_model_map(env.get("MODEL_MAP", "")),
                  signature_key=signature_key, debug=bool(debug), **values)


def _option_values(args: argparse.Namespace, env: dict) -> dict:
    """Return the ENV_OPTIONS settings given by flags, else by the environment."""
    values = {}
    for name_env, _flag, name, conv, _text in ENV_OPTIONS:
        raw = getattr(args, name, None)
        if raw is None and env.get(name_env, "") != "":
            try:
                raw = conv(env[name_env])
            except ValueError as exc:
                if conv not in (int, float):
                    raise ValueError(f"{name_env}: {exc}") from None
                raise ValueError(f"{name_env}={env[name_env]!r} is not a valid {conv.__name__}")
        if raw is not None:
            values[name] = raw
    return values


def _signature_key(secret: str, seed: str) -> bytes:
    """Return the carriers' HMAC key: from PROXY_SIGNATURE_KEY, else from the first API key
    (or token command), so instances sharing it agree without configuration."""
    if secret:
        return hashlib.sha256(secret.encode()).digest()
    return hmac.new(seed.encode(), b"claude_gemini_proxy signatures v1", hashlib.sha256).digest()


# == Errors ===================================================================
# ProxyError is what a client receives; UPSTREAM_ERRORS maps Gemini statuses onto it.

class ProxyError(Exception):
    """An error the client receives as an Anthropic error body."""

    def __init__(self, status: int, error_type: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.headers = headers or {}

    def body(self, request_id: str = "") -> dict:
        error = {"type": "error", "error": {"type": self.error_type, "message": self.message}}
        if request_id:
            error["request_id"] = request_id
        return error


class UpstreamError(ProxyError):
    """A Gemini error answer, with what retries and key rotation need to know about it."""

    def __init__(self, status: int, error_type: str, message: str, headers: dict | None = None,
                 upstream_status: int = 0, retry_delay: float | None = None,
                 key_invalid: bool = False, overflow: tuple | None = None):
        super().__init__(status, error_type, message, headers)
        self.upstream_status = upstream_status
        self.retry_delay = retry_delay  # seconds from Gemini's RetryInfo, or None
        self.key_invalid = key_invalid  # the key (not the request) was refused
        self.overflow = overflow  # (prompt tokens or 0, limit or 0) when the input is too long


class _ClientGone(Exception):
    """The client closed its connection; stop working for it."""


# Gemini HTTP status -> (client status, Anthropic error type)
UPSTREAM_ERRORS = {
    400: (400, "invalid_request_error"),
    401: (403, "permission_error"),
    403: (403, "permission_error"),
    404: (404, "not_found_error"),
    408: (504, "timeout_error"),
    413: (413, "request_too_large"),
    429: (429, "rate_limit_error"),
    500: (500, "api_error"),
    502: (502, "api_error"),
    503: (529, "overloaded_error"),
    504: (504, "timeout_error"),
}
# Errors a retry cannot fix: Claude Code stops retrying on x-should-retry: false.
NOT_RETRYABLE = {400, 401, 403, 404, 413}
DEFAULT_RETRY_AFTER = 10
MAX_KEY_REST = 3600.0  # a rate-limited key rests at most this long, whatever Gemini says
MAX_ERROR_MESSAGE = 4096  # characters of Gemini's error message a client sees
MAX_ERROR_PARSED = 1 << 20  # bytes of an error body parsed; a longer one maps by its status
# Gemini's "input too long" wordings: AI Studio and Vertex "The input token count (N) exceeds
# the maximum number of tokens allowed (M).", Vertex without the count ("... allowed M."),
# and Vertex's older "the input token count is N but model only supports up to M".
CONTEXT_OVERFLOW_RE = re.compile(
    r"input token count(?: is)?\W*(\d*)\W*(?:exceeds the maximum number of tokens allowed|"
    r"but (?:the )?model only supports up to)\W*(\d*)", re.IGNORECASE)


GONE_FILE_WORDS = "or it may not exist"  # Gemini's 403 for a file it no longer has


def _parse_retry_delay(error: dict) -> float | None:
    """Return the seconds of a Gemini RetryInfo detail, within [0, MAX_KEY_REST], or None."""
    details = error.get("details")
    for detail in details if isinstance(details, list) else ():
        delay = detail.get("retryDelay") if isinstance(detail, dict) else None
        if isinstance(delay, str) and delay.endswith("s"):
            try:
                seconds = float(delay[:-1])
            except ValueError:
                return None
            return None if seconds != seconds else min(max(seconds, 0.0), MAX_KEY_REST)
    return None


def _error_object(payload: bytes) -> tuple:
    """Return (Gemini's error object, its message) from an error body of any shape."""
    try:
        parsed = json.loads(payload[:MAX_ERROR_PARSED])
    except (ValueError, RecursionError):  # not JSON, cut short, or nested without end
        return {}, payload[:MAX_ERROR_MESSAGE].decode("utf-8", "replace")
    if isinstance(parsed, list) and parsed:
        parsed = parsed[0]
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(error, dict):
        return {}, str(error or "")
    message = error.get("message")
    return error, message if isinstance(message, str) else str(message or "")


def _overflow_message(tokens: int, limit: int) -> str:
    """Return the Anthropic wording Claude Code compacts on (a limit Gemini did not give:
    just under the count)."""
    return f"prompt is too long: {tokens} tokens > {limit or max(0, tokens - 1)} maximum"


def _backoff_seconds(attempt: int) -> float:
    """Return the wait before retry `attempt` (from 0) of a failing upstream, with jitter."""
    return min(0.5 * 2 ** attempt, 8.0) * (1 + random.random() / 4)


def _upstream_error(status: int, payload: bytes) -> UpstreamError:
    """Return the UpstreamError for a Gemini error response (any body, any size)."""
    if 300 <= status < 400:  # never followed: a key must not go where the base URL did not say
        return UpstreamError(502, "api_error", f"the upstream redirected (HTTP {status}); set "
                             "GEMINI_API_BASE to the address it redirects to",
                             upstream_status=status)
    error, message = _error_object(payload)
    message = message[:MAX_ERROR_MESSAGE]
    client_status, error_type = UPSTREAM_ERRORS.get(
        status, (500, "api_error") if status >= 500 else (400, "invalid_request_error"))
    headers = {}
    key_invalid = status == 401 or b"API_KEY_INVALID" in payload[:MAX_ERROR_PARSED]
    retry_delay = _parse_retry_delay(error)
    overflow = CONTEXT_OVERFLOW_RE.search(message)
    if overflow:  # the count may be missing: UpstreamClient.generate() fills it in
        overflow = (int(overflow.group(1) or 0), int(overflow.group(2) or 0))
        message = _overflow_message(*overflow)
    elif status == 403 and GONE_FILE_WORDS in message:  # a deleted file, not a refused key
        client_status, error_type = 400, "invalid_request_error"
        message = f"file_id: Gemini no longer has this file (deleted, or past 48 hours): {message}"
    elif status in (401, 403) or key_invalid:
        client_status, error_type = 403, "permission_error"
        message = f"Gemini rejected the proxy's API key: {message}"
    else:
        message = f"Gemini: {message}" if message else f"Gemini answered HTTP {status}"
    if client_status in (429, 529):
        if retry_delay:
            wait = int(retry_delay + 0.999)
        else:  # an overloaded Gemini recovers in seconds: the proxy's own next backoff
            wait = (int(_backoff_seconds(1) + 0.999) if client_status == 529
                    else DEFAULT_RETRY_AFTER)
        headers["retry-after"] = str(max(1, wait))
    if status in NOT_RETRYABLE:
        headers["x-should-retry"] = "false"
    return UpstreamError(client_status, error_type, message, headers, upstream_status=status,
                         retry_delay=retry_delay, key_invalid=key_invalid,
                         overflow=overflow or None)


def _transport_error(exc: Exception, doing: str) -> ProxyError:
    """Return the error for a failed upstream socket step: a timeout is 504, the rest 502."""
    if isinstance(exc, socket.timeout):
        return ProxyError(504, "timeout_error", f"Gemini did not answer in time ({doing})")
    return ProxyError(502, "api_error", f"Gemini failed while {doing}: "
                      f"{exc.__class__.__name__} {exc}".rstrip())


def _bad_request(message: str) -> ProxyError:
    return ProxyError(400, "invalid_request_error", message, {"x-should-retry": "false"})


# == Signature store ==========================================================
# Gemini's thought signatures travel with the conversation inside HMAC-tagged carriers
# (tool_use ids and thinking signatures); the LRU only saves re-verifying them.

CARRIER_VERSION = b"\x01"
CARRIER_MAC_BYTES = 16
CARRIER_NONCE_BYTES = 6  # two calls with the same Gemini call id still get distinct tool ids
# The shortest token a carrier makes (empty model, call id and signature): shorter ids are not.
CARRIER_MIN_CHARS = (1 + CARRIER_NONCE_BYTES + 4 + CARRIER_MAC_BYTES) * 4 // 3
# What kind of Gemini part a signature came on, so replay puts it back on the same kind.
KIND_CALL, KIND_THOUGHT = b"f", b"t"


# What a carrier holds: the issuing model, part kind, Gemini call id and signature.
Carried = namedtuple("Carried", "model kind call_id signature")


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _encode_carrier(key: bytes, carried: Carried) -> str:
    """Return an id-safe token ([A-Za-z0-9_-]) holding `carried`, tagged with an HMAC."""
    model, call_id = carried.model.encode(), carried.call_id.encode()
    signature = carried.signature.encode("ascii", "replace")
    try:  # store canonical base64 as bytes (a quarter shorter); anything else verbatim
        raw = base64.b64decode(signature, validate=True)
        packed = b"\x01" + raw if base64.b64encode(raw) == signature else b"\x00" + signature
    except (binascii.Error, ValueError):
        packed = b"\x00" + signature
    if len(model) > 255 or len(call_id) > 255:
        raise ValueError("model or call id too long for a carrier")
    payload = (CARRIER_VERSION + secrets.token_bytes(CARRIER_NONCE_BYTES) + carried.kind
               + bytes([len(model)]) + model
               + bytes([len(call_id)]) + call_id + packed)
    mac = hmac.new(key, payload, hashlib.sha256).digest()[:CARRIER_MAC_BYTES]
    return _b64url(payload + mac)


def _decode_carrier(key: bytes, token: str) -> Carried | None:
    """Return what a carrier token holds, or None if it is not ours or was altered."""
    try:
        blob = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        return None
    payload, mac = blob[:-CARRIER_MAC_BYTES], blob[-CARRIER_MAC_BYTES:]
    if len(payload) < 5 + CARRIER_NONCE_BYTES or payload[:1] != CARRIER_VERSION:
        return None
    if not hmac.compare_digest(
        mac, hmac.new(key, payload, hashlib.sha256).digest()[:CARRIER_MAC_BYTES]
    ):
        return None
    at = 1 + CARRIER_NONCE_BYTES
    kind, at = payload[at:at + 1], at + 1
    model = payload[at + 1:at + 1 + payload[at]].decode()
    at += 1 + payload[at]
    call_id = payload[at + 1:at + 1 + payload[at]].decode()
    at += 1 + payload[at]
    packed = payload[at:]
    if packed[:1] == b"\x01":
        signature = base64.b64encode(packed[1:]).decode("ascii")
    else:
        signature = packed[1:].decode("ascii")
    return Carried(model, kind, call_id, signature)


NAMES_VERSION = b"\x02"  # never a carrier's version byte, so neither token passes as the other
KIND_BATCH, KIND_FILE = b"b", b"f"


def _encode_names(key: bytes, kind: bytes, fields: list) -> str:
    """Return a deterministic, HMAC-tagged token holding strings (Gemini resource names)."""
    payload = NAMES_VERSION + kind + "\n".join(fields).encode()
    mac = hmac.new(key, payload, hashlib.sha256).digest()[:CARRIER_MAC_BYTES]
    return _b64url(payload + mac)


def _decode_names(key: bytes, kind: bytes, token: str) -> list | None:
    """Return the strings of an _encode_names token of this kind, or None if forged or foreign."""
    try:
        blob = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        return None
    payload, mac = blob[:-CARRIER_MAC_BYTES], blob[-CARRIER_MAC_BYTES:]
    if payload[:2] != NAMES_VERSION + kind or not hmac.compare_digest(
        mac, hmac.new(key, payload, hashlib.sha256).digest()[:CARRIER_MAC_BYTES]
    ):
        return None
    return payload[2:].decode().split("\n")


class SignatureStore:
    """Thread-safe LRU of verified carriers: token -> Carried, bounded in size and age."""

    def __init__(self, key: bytes, max_entries: int = 100_000, ttl: float = 3600.0,
                 now=time.monotonic):
        self.key = key
        self.max_entries = max_entries
        self.ttl = ttl
        self.now = now
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, token: str, carried: Carried) -> None:
        with self._lock:
            self._entries[token] = (self.now() + self.ttl, carried)
            self._entries.move_to_end(token)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def get(self, token: str) -> Carried | None:
        with self._lock:
            entry = self._entries.get(token)
            if entry is None:
                return None
            if entry[0] < self.now():
                del self._entries[token]
                return None
            self._entries.move_to_end(token)
            return entry[1]

    def issue(self, carried: Carried) -> str:
        """Return a new carrier token for `carried` and remember it."""
        token = _encode_carrier(self.key, carried)
        self.put(token, carried)
        return token

    def resolve(self, token: str) -> Carried | None:
        """Return the Carried behind a token: from memory, else verified from the token itself."""
        if not token:
            return None
        carried = self.get(token)
        if carried is None:
            carried = _decode_carrier(self.key, token)
            if carried is not None:
                self.put(token, carried)
        return carried


# == Request: shapes and validation ===========================================
# One description of every Messages field the translator reads; _validate_body() checks a body
# against it before translation, so a wrong type anywhere is a 400 naming its path.

MAX_JSON_DEPTH = 128  # deeper bodies are hostile or broken; no real client nests this far
MAX_STOP_SEQUENCES = 64
MAX_STOP_SEQUENCE_CHARS = 1000
# Apart, not as one alternation: re finds a literal-prefixed pattern 15 times faster.
ESCAPED_SURROGATE_RE = re.compile(rb"\\u[dD][89a-fA-F]")
RAW_SURROGATE_RE = re.compile(rb"\xed[\xa0-\xbf]")  # CESU-8 bytes of U+D800..U+DFFF
SURROGATE_RE = re.compile("[\ud800-\udfff]")
INFINITY = float("inf")


class _Invalid(Exception):
    """A value that does not fit its shape; containers add their key to .path on the way out."""

    def __init__(self, message: str, key=None):
        super().__init__(message)
        self.message = message
        self.path = [] if key is None else [key]


def _check_any(value, depth: int) -> None:
    """Accept any JSON value nested at most MAX_JSON_DEPTH deep with finite numbers."""
    kind = type(value)
    if kind is float:
        if value != value or value in (INFINITY, -INFINITY):
            raise _Invalid("must be a finite number")
        return
    if kind is not dict and kind is not list:
        return
    if depth > MAX_JSON_DEPTH:
        raise _Invalid(f"nested deeper than {MAX_JSON_DEPTH} levels")
    items = value.items() if kind is dict else enumerate(value)
    for key, item in items:
        if type(item) in _WALKED:
            try:
                _check_any(item, depth + 1)
            except _Invalid as invalid:
                invalid.path.append(key)
                raise


_WALKED = (dict, list, float)


class _Shape:
    """Any JSON value (depth and finite numbers still checked); the subclasses narrow it."""

    types: tuple = (object,)
    name = "any value"
    plain = frozenset((str, int, bool))  # JSON types accepted without a check call (speed)

    def check(self, value, depth: int) -> None:
        _check_any(value, depth)

    def _enter(self, value, depth: int) -> None:
        """Refuse a container of the wrong JSON type or one nested too deeply."""
        if type(value) is not self.types[0]:
            raise _Invalid(f"must be {self.name}")
        if depth > MAX_JSON_DEPTH:
            raise _Invalid(f"nested deeper than {MAX_JSON_DEPTH} levels")


class _Scalar(_Shape):
    """A string, integer, number or boolean, with optional limits."""

    NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}

    def __init__(self, kind: type, minimum: int | None = None, min_length: int = 0,
                 max_length: int | None = None, choices: tuple = ()):
        self.types = (int, float) if kind is float else (kind,)
        self.name = self.NAMES[kind]
        self.minimum, self.min_length, self.max_length = minimum, min_length, max_length
        self.choices = choices
        limited = choices or minimum is not None or min_length or max_length is not None
        self.plain = frozenset(() if limited or kind is float else self.types)

    def check(self, value, depth: int) -> None:
        if type(value) not in self.types:  # type(), not isinstance(): True is no integer
            raise _Invalid(f"must be {self.name}")
        if self.choices and value not in self.choices:
            raise _Invalid("must be one of " + ", ".join(repr(c) for c in self.choices))
        if type(value) is float and (value != value or value in (INFINITY, -INFINITY)):
            raise _Invalid("must be a finite number")
        if self.minimum is not None and value < self.minimum:
            raise _Invalid(f"must be at least {self.minimum}")
        if self.min_length and len(value) < self.min_length:
            raise _Invalid("must not be empty")
        if self.max_length is not None and len(value) > self.max_length:
            raise _Invalid(f"must be at most {self.max_length} characters")


class _Obj(_Shape):
    """An object with typed fields; a null optional field counts as absent, others are walked."""

    types = (dict,)
    name = "an object"
    plain = frozenset()

    def __init__(self, fields: dict, required: tuple = ()):
        self.fields = fields
        self.required = required

    def check(self, value, depth: int) -> None:
        self._enter(value, depth)
        for name in self.required:
            if value.get(name) is None:
                raise _Invalid("field required", name)
        fields = self.fields
        for key, item in value.items():
            shape = fields.get(key, ANY)
            if item is None or type(item) in shape.plain:
                continue
            try:
                shape.check(item, depth + 1)
            except _Invalid as invalid:
                invalid.path.append(key)
                raise


class _Arr(_Shape):
    """An array whose items all have one shape."""

    types = (list,)
    name = "an array"
    plain = frozenset()

    def __init__(self, item: _Shape, max_items: int | None = None):
        self.item = item
        self.max_items = max_items

    def check(self, value, depth: int) -> None:
        self._enter(value, depth)
        if self.max_items is not None and len(value) > self.max_items:
            raise _Invalid(f"must have at most {self.max_items} items")
        check, plain = self.item.check, self.item.plain
        for i, item in enumerate(value):
            if type(item) in plain:
                continue
            try:
                check(item, depth + 1)
            except _Invalid as invalid:
                invalid.path.append(i)
                raise


class _Either(_Shape):
    """One of several shapes, chosen by the JSON type of the value."""

    def __init__(self, *shapes: _Shape):
        self.shapes = shapes
        self.types = tuple(kind for shape in shapes for kind in shape.types)
        self.name = " or ".join(shape.name for shape in shapes)
        self.plain = frozenset().union(*(shape.plain for shape in shapes))

    def check(self, value, depth: int) -> None:
        for shape in self.shapes:
            if type(value) in shape.types:
                shape.check(value, depth)
                return
        raise _Invalid(f"must be {self.name}")


class _Blocks(_Shape):
    """An object tagged by a string "type"; `by_type` maps types to shapes (others: _Obj({}))."""

    types = (dict,)
    name = "an object"
    plain = frozenset()

    def __init__(self, by_type: dict):
        self.by_type = by_type  # shared dicts: an entry added later is checked too

    def check(self, value, depth: int) -> None:
        if type(value) is not dict:
            raise _Invalid("must be an object")
        kind = value.get("type")
        if type(kind) is not str:
            raise _Invalid("must be a string" if kind is not None else "field required", "type")
        self.by_type.get(kind, ANY_OBJECT).check(value, depth)


ANY = _Shape()
ANY_OBJECT = _Obj({})
STRING = _Scalar(str)
BOOLEAN = _Scalar(bool)
STRINGS = _Arr(STRING)

# Block shapes by type. Add a new block type here (and its translation in _HistoryTranslator).
TEXT_BLOCK = _Obj({"text": STRING}, required=("text",))
MEDIA_SOURCES = {
    "base64": _Obj({"media_type": STRING, "data": STRING}, required=("data",)),
    "url": _Obj({"url": STRING}, required=("url",)),
    "text": _Obj({"media_type": STRING, "data": STRING}, required=("data",)),
    "file": _Obj({"file_id": STRING}, required=("file_id",)),
}
IMAGE_BLOCK = _Obj({"source": _Blocks(MEDIA_SOURCES)}, required=("source",))
DOCUMENT_SOURCES = dict(MEDIA_SOURCES, content=_Obj({"content": _Either(
    STRING, _Arr(_Blocks({"text": TEXT_BLOCK, "image": IMAGE_BLOCK})))}))
DOCUMENT_BLOCK = _Obj({"source": _Blocks(DOCUMENT_SOURCES), "title": STRING}, required=("source",))
SEARCH_RESULT_BLOCK = _Obj({"source": STRING, "title": STRING,
                           "content": _Arr(_Blocks({"text": TEXT_BLOCK}))})
TOOL = _Obj({
    "name": STRING, "type": STRING, "description": STRING, "input_schema": ANY_OBJECT,
    "defer_loading": BOOLEAN, "allowed_domains": STRINGS, "blocked_domains": STRINGS,
}, required=("name",))
# Mid-conversation tool changes (SDK beta_request_tool_addition_block_param.py): what _tool_changes
# reads of the tool they name.
TOOL_CHANGE_TARGETS = {
    "tool_reference": _Obj({"name": STRING}, required=("name",)),
    "mcp_tool_reference": _Obj({"server_name": STRING, "name": STRING},
                              required=("server_name", "name")),
    "mcp_toolset_reference": _Obj({"server_name": STRING}, required=("server_name",)),
    "tool_definition": _Obj({"definition": TOOL}, required=("definition",)),
}
TOOL_CHANGE = _Obj({"tool": _Blocks(TOOL_CHANGE_TARGETS)}, required=("tool",))
TOOL_CHANGES = {"tool_addition": TOOL_CHANGE, "tool_removal": TOOL_CHANGE}
TOOL_RESULT_BLOCKS = {
    "text": TEXT_BLOCK,
    "image": IMAGE_BLOCK,
    "document": DOCUMENT_BLOCK,
    "search_result": SEARCH_RESULT_BLOCK,
    "tool_reference": _Obj({"tool_name": STRING}, required=("tool_name",)),
}
CONTENT_BLOCKS = {
    "text": TEXT_BLOCK,
    "mid_conv_system": _Obj({"content": _Either(STRING, _Arr(_Blocks({"text": TEXT_BLOCK})))}),
    "image": IMAGE_BLOCK,
    "document": DOCUMENT_BLOCK,
    "search_result": SEARCH_RESULT_BLOCK,
    "thinking": _Obj({"thinking": STRING, "signature": STRING}),
    "redacted_thinking": _Obj({"data": STRING}),
    "tool_use": _Obj({"id": STRING, "name": STRING, "input": ANY_OBJECT}, required=("id", "name")),
    "tool_result": _Obj({"tool_use_id": STRING, "is_error": BOOLEAN, "content": _Either(
        STRING, _Arr(_Blocks(TOOL_RESULT_BLOCKS)))}, required=("tool_use_id",)),
    **TOOL_CHANGES,
    "compaction": _Obj({"content": STRING, "tool_changes": _Arr(_Blocks(TOOL_CHANGES))}),
    # Server tool blocks: only code execution's are read (_code_execution_parts).
    "server_tool_use": _Obj({"id": STRING, "name": STRING, "input": _Obj({"code": STRING})},
                           required=("id", "name")),
    "code_execution_tool_result": _Obj({"tool_use_id": STRING, "content": _Blocks({
        "code_execution_result": _Obj({"stdout": STRING, "stderr": STRING,
                                      "return_code": _Scalar(int)}),
        "code_execution_tool_result_error": _Obj({"error_code": STRING})})},
        required=("tool_use_id", "content")),
}
SYSTEM_BLOCKS = {"text": TEXT_BLOCK}
MESSAGE = _Obj({
    "role": _Scalar(str, choices=("user", "assistant", "system")),
    "content": _Either(STRING, _Arr(_Blocks(CONTENT_BLOCKS))),
}, required=("role", "content"))
NUMBER = _Scalar(float)
# The Messages body; count_tokens takes the same one (the translator reads both alike).
MESSAGES_BODY = _Obj({
    "model": _Scalar(str, min_length=1),
    "messages": _Arr(MESSAGE),
    "max_tokens": _Scalar(int, minimum=1),
    "stream": BOOLEAN,
    "system": _Either(STRING, _Arr(_Blocks(SYSTEM_BLOCKS))),
    "tools": _Arr(TOOL),
    "tool_choice": _Obj({"type": STRING, "name": STRING}),
    "stop_sequences": _Arr(_Scalar(str, min_length=1, max_length=MAX_STOP_SEQUENCE_CHARS),
                          max_items=MAX_STOP_SEQUENCES),
    "temperature": NUMBER,
    "top_p": NUMBER,
    "top_k": _Scalar(int),
    "thinking": _Obj({"type": STRING, "budget_tokens": _Scalar(int), "display": STRING}),
    "output_config": _Obj({"effort": STRING, "format": _Obj({"type": STRING,
                                                           "schema": ANY_OBJECT})}),
}, required=("model", "messages"))


COUNT = _Scalar(int)
# Gemini's answer chunks (GenerateContentResponse): the fields the fold reads. Metadata the
# fold reads leniently (grounding, URL context, code execution) is left out.
GEMINI_CHUNK = _Obj({
    "candidates": _Arr(_Obj({
        "content": _Obj({"role": STRING, "parts": _Arr(_Obj({
            "text": STRING, "thought": BOOLEAN, "thoughtSignature": STRING,
            "functionCall": _Obj({
                "name": STRING, "id": STRING, "args": ANY_OBJECT, "willContinue": BOOLEAN,
                "partialArgs": _Arr(_Obj({"jsonPath": STRING, "stringValue": STRING,
                                        "numberValue": NUMBER, "boolValue": BOOLEAN,
                                        "willContinue": BOOLEAN}, required=("jsonPath",))),
            }),
        }))}),
        "finishReason": STRING, "finishMessage": STRING,
    })),
    "usageMetadata": _Obj({name: COUNT for name in (
        "promptTokenCount", "candidatesTokenCount", "totalTokenCount", "cachedContentTokenCount",
        "thoughtsTokenCount", "toolUsePromptTokenCount")}),
    "promptFeedback": _Obj({"blockReason": STRING}),
    "modelVersion": STRING,
    "error": _Obj({"code": COUNT, "message": STRING, "status": STRING}),
})


def _shape_problem(value, shape: _Shape) -> str | None:
    """Return "path: what is wrong" for the first field of value not fitting shape, or None."""
    try:
        shape.check(value, 1)
    except _Invalid as invalid:
        path = ".".join(str(key) for key in reversed(invalid.path))
        return f"{path or 'the body'}: {invalid.message}"
    return None


def _validate_body(body, shape: _Shape = MESSAGES_BODY) -> None:
    """Raise a 400 naming the path (messages.3.content.1.tool_use_id) of the first bad field."""
    problem = _shape_problem(body, shape)
    if problem:
        raise _bad_request(problem if not problem.startswith("the body:")
                          else "request body:" + problem[9:])


def _decode_json_body(data: bytes):
    """Return the parsed body, lone surrogates replaced by U+FFFD; raise a 400 for bad JSON."""
    try:
        return _without_lone_surrogates(json.loads(data), data, "the request")
    except RecursionError:  # made here, in no local: a cycle through this frame would keep
        raise _bad_request(  # `data` (32 MB) alive until the cycle collector ran
            f"request body: nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:
        raise _bad_request(f"request body is not valid JSON: {exc}") from None


def _without_lone_surrogates(value, data: bytes, what: str):
    """Return value, parsed from data, with lone UTF-16 surrogates (escaped or raw in the
    bytes) replaced by U+FFFD: nothing can encode them later. DEBUG says where."""
    if ESCAPED_SURROGATE_RE.search(data) or b"\xed" in data and RAW_SURROGATE_RE.search(data):
        repaired = []
        value = _repair_surrogates(value, [], repaired)
        if repaired:
            log.debug("replaced lone UTF-16 surrogates with U+FFFD in %s at %s", what,
                      ", ".join(repaired))
    return value


def _repair_surrogates(value, path: list, repaired: list):
    """Return value with lone surrogates in its strings replaced, noting where in `repaired`."""
    kind = type(value)
    if kind is str:
        if not SURROGATE_RE.search(value):
            return value
        fixed = value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        if fixed.count("\ufffd") > value.count("\ufffd"):  # raw valid pairs just join up
            repaired.append(".".join(path) or "request body")
        return fixed
    if kind is list:
        return [_repair_surrogates(item, path + [str(i)], repaired) for i, item in
                enumerate(value)]
    if kind is dict:
        return {_repair_surrogates(key, path + [key], repaired):
                _repair_surrogates(item, path + [key], repaired) for key, item in value.items()}
    return value


# == Request: Anthropic -> Gemini =============================================
# to_gemini_request() is pure: a Messages body in, a GeminiRequest (body + what the
# response side needs to know) out. One helper per block kind.

GEMINI_DECLARATION_LIMIT = 512  # function declarations Gemini accepts in one request
SUPPORTED_IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/heic", "image/heif")
# Kinds Gemini 3 takes inside functionResponse.parts; older models get them as sibling parts.
FUNCTION_RESPONSE_MEDIA = (
    "image/png",
    "image/jpeg",
    "image/webp",
    "application/pdf",
    "text/plain",
)
GEMINI_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,63}$")
GEMINI_NAME_BAD_CHARS_RE = re.compile(r"[^A-Za-z0-9_.:-]")
BILLING_HEADER_PREFIX = "x-anthropic-billing-header"
# A role=system message or mid_conv_system block stays where the client put it, as user text
# marked for the model; in systemInstruction it would change the start of every later prompt.
SYSTEM_NOTE = "<system-message>\n%s\n</system-message>"
SAFETY_OFF = [{"category": c, "threshold": "OFF"} for c in (
    "HARM_CATEGORY_HARASSMENT", "HARM_CATEGORY_HATE_SPEECH",
    "HARM_CATEGORY_SEXUALLY_EXPLICIT", "HARM_CATEGORY_DANGEROUS_CONTENT")]
TOOL_CHOICE_MODES = {"auto": "AUTO", "any": "ANY", "tool": "ANY", "none": "NONE"}
EFFORT_LEVELS = {"low": "LOW", "medium": "MEDIUM", "high": "HIGH", "xhigh": "HIGH", "max": "HIGH"}
EFFORT_BUDGETS = {"low": 1024, "medium": 8192, "high": 16384, "xhigh": 24576, "max": 32768}


# The original routing rows: these client names go to DEFAULT_GEMINI_MODEL (None) or pass through.
MODEL_TABLE = {
    "Kimi-K2.5": None,
    "Claude Sonnet 4.6": None,
    "Claude Opus 4.6": None,
    "gemini-3.5-flash": "gemini-3.5-flash",
    "gemini-3.1-pro-preview": "gemini-3.1-pro-preview",
}
MODEL_VERSION_RE = re.compile(r"gemini-(\d+)(?:\.(\d+))?")
UNSAFE_MODEL_PARTS = ("/", "?", "#", "%", "..", "\\")


def map_model(client_model: str, config: Config) -> str:
    """Return the Gemini model for a client's model name; raise ProxyError for unsafe names."""
    name = client_model[:-4] if client_model.endswith("[1m]") else client_model
    if not (name.isascii() and name.isprintable()):  # it reaches x-gemini-model and the logs
        raise _bad_request(f"model: {ascii(client_model)} has control or non-ASCII characters")
    if any(bad in name for bad in UNSAFE_MODEL_PARTS) or not name.strip():
        raise ProxyError(
            400, "invalid_request_error", f"model: {client_model!r} is not a valid model name"
        )
    if name in MODEL_TABLE:
        return MODEL_TABLE[name] or config.default_model
    for pattern, target in config.model_map:
        if fnmatch.fnmatchcase(name, pattern):
            return target
    if name.startswith("gemini-"):
        return name
    return config.default_model


def _model_version(model: str) -> tuple:
    """Return (major, minor) of a Gemini model name; unknown names count as current (3, 0)."""
    match = MODEL_VERSION_RE.match(model)
    if not match:
        return (3, 0)
    return (int(match.group(1)), int(match.group(2) or 0))


class GeminiRequest:
    """A translated request: the Gemini body plus what the response side needs."""

    def __init__(self, client_model: str, model: str, body: dict, stream: bool, tool_names: dict,
                 stop_sequences: tuple, thinking: str, server_tools: dict):
        self.client_model = client_model
        self.model = model
        self.body = body
        self.stream = stream
        self.tool_names = tool_names  # Gemini function name -> client tool name
        self.stop_sequences = stop_sequences
        self.thinking = thinking  # "" (no thinking blocks), "summarized" or "omitted"
        self.server_tools = server_tools  # "web_search"/"web_fetch"/"code_execution" -> tool
        self.web_search = server_tools.get("web_search")  # answered by Google Search
        self._payload = None

    @property
    def whole_answer(self) -> bool:
        """True when the answer is read whole: search and fetch blocks, built from metadata
        Gemini sends at the end, must come before the text."""
        return bool(self.web_search or self.server_tools.get("web_fetch"))

    def edited(self) -> None:
        """Forget the serialized body: a self-healing retry changed it."""
        self._payload = None

    def payload(self) -> bytes:
        """Return the body's bytes as sent upstream (serialized once, whatever asks first)."""
        if self._payload is None:
            self._payload = json.dumps(
                self.body, separators=(",", ":"), ensure_ascii=False
            ).encode()
        return self._payload


def _gemini_tool_name(name: str) -> str:
    """Return a function name Gemini accepts; a changed name gets a hash so it stays unique."""
    if GEMINI_NAME_RE.match(name):
        return name
    cleaned = GEMINI_NAME_BAD_CHARS_RE.sub("_", name)
    if not re.match(r"[A-Za-z_]", cleaned):
        cleaned = "_" + cleaned
    return f"{cleaned[:55]}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def _blocks(content) -> list:
    """Return a (validated) message content as a block list: a string is one text block."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return content


def _system_note(content) -> list:
    """Return the text part a mid-conversation system message becomes, in place."""
    texts = _texts(content) if content is not None else []
    return [{"text": SYSTEM_NOTE % "\n\n".join(texts)}] if texts else []


def _texts(content) -> list:
    """Return the text strings of a system prompt (string or text blocks)."""
    texts = []
    for block in _blocks(content):
        text = block.get("text")
        if block["type"] == "text" and text:
            if not text.startswith(BILLING_HEADER_PREFIX):  # changes per call: defeats caching
                texts.append(text)
    return texts


def _check_media_type(media_type: str, allowed: tuple, where: str) -> str:
    if media_type not in allowed:
        raise _bad_request(
            f"{where}: {media_type or 'this media type'} is not supported by Gemini; "
            f"send one of {', '.join(allowed)}"
        )
    return media_type


def _media_parts(block: dict, where: str, key: bytes) -> list:
    """Return the Gemini parts for an image or document block (key: for file ids)."""
    source = block["source"]
    kind = source["type"]
    if kind == "file":  # {file_id}: uploaded through POST /v1/files
        return [_file_data(source, where, key)]
    if block["type"] == "image":
        if kind == "base64":
            media_type = _check_media_type(source.get("media_type") or "", SUPPORTED_IMAGE_TYPES,
                                           where)
            return [{"inlineData": {"mimeType": media_type, "data": _base64_data(source)}}]
        if kind == "url":
            guessed = mimetypes.guess_type(source["url"])[0] or "image/jpeg"
            media_type = _check_media_type(guessed, SUPPORTED_IMAGE_TYPES, where)
            return [{"fileData": {"mimeType": media_type, "fileUri": source["url"]}}]
        raise _bad_request(f"{where}: image source type {kind!r} is not supported "
                          "(use base64, url or file)")
    if kind == "base64":  # document
        media_type = source.get("media_type") or "application/pdf"
        if media_type == "text/plain":
            try:
                raw = base64.b64decode(_base64_data(source))
            except (binascii.Error, ValueError):
                raise _bad_request(f"{where}.source.data: must be base64") from None
            return [{"text": raw.decode("utf-8", "replace")}]
        _check_media_type(media_type, ("application/pdf",), where)
        return [{"inlineData": {"mimeType": media_type, "data": _base64_data(source)}}]
    if kind == "text":
        return [{"text": source["data"]}] if source["data"] else []
    if kind == "url":
        return [{"fileData": {"mimeType": "application/pdf", "fileUri": source["url"]}}]
    if kind == "content":
        parts = []
        for i, item in enumerate(_blocks(source.get("content") or "")):
            if item["type"] == "text" and item.get("text"):
                parts.append({"text": item["text"]})
            elif item["type"] == "image":
                parts.extend(_media_parts(item, f"{where}.source.content.{i}", key))
        return parts
    raise _bad_request(f"{where}: document source type {kind!r} is not supported by Gemini")


def _base64_data(source: dict) -> str:
    data = source["data"]
    if data.startswith("data:"):  # some clients send data URLs
        data = data.partition(",")[2]
    return data


# _Blocks the Messages API takes in history that Gemini has no use for: server-side artefacts,
# and directives read elsewhere (tool_addition / tool_removal by _tool_changes).
SILENT_BLOCKS = frozenset((
    "redacted_thinking", "server_tool_use", "web_search_tool_result", "web_fetch_tool_result",
    "code_execution_tool_result", "bash_code_execution_tool_result",
    "text_editor_code_execution_tool_result", "tool_search_tool_result", "mcp_tool_use",
    "mcp_tool_result", "container_upload", "fallback", "advisor_tool_result", "tool_addition",
    "tool_removal",
))
WARNED_BLOCK_TYPES_LIMIT = 64  # a client inventing types cannot flood the log
_warned_block_types: set = set()


def _other_block_parts(block: dict) -> list:
    """Return the text parts for a block no ladder handles; never a 400, never silent text loss."""
    kind = block["type"]
    if kind == "search_result":  # {source, title, content: [text]}
        inner = "\n".join(c["text"] for c in block.get("content") or ())
        return [{"text": f"{block.get('title') or ''} ({block.get('source') or ''})\n{inner}"}]
    if kind == "compaction":  # {content: summary or null (a failed compaction: a no-op)}
        return [{"text": block["content"]}] if block.get("content") else []
    if kind in SILENT_BLOCKS:
        return []
    if isinstance(block.get("text"), str):  # a block type newer than this proxy
        return [{"text": block["text"]}] if block["text"] else []
    if kind not in _warned_block_types and len(_warned_block_types) < WARNED_BLOCK_TYPES_LIMIT:
        _warned_block_types.add(kind)
        log.warning("content blocks of type %r are not understood and are left out", kind[:64])
    return []


def _file_data(source: dict, where: str, key: bytes) -> dict:
    """Return the fileData part for a file_id source; 400 for a foreign or expired id."""
    file_id = source.get("file_id")
    token = file_id[5:] if isinstance(file_id, str) and file_id.startswith("file_") else ""
    fields = _decode_names(key, KIND_FILE, token) if token else None
    if not fields or len(fields) != 4:
        raise _bad_request(f"{where}.source.file_id: {file_id!r} is not a file uploaded "
                          "through this proxy (or it was uploaded with another key)")
    _name, mime_type, expires, uri = fields
    if int(expires) <= time.time():
        raise _bad_request(f"{where}.source.file_id: the file expired at "
                          f"{_rfc3339_of(int(expires))} (Gemini keeps uploads 48 hours); "
                          "upload it again")
    return {"fileData": {"mimeType": mime_type, "fileUri": uri}}


def _code_execution_parts(block: dict) -> list:
    """Return the executableCode / codeExecutionResult part of a code execution block in an
    assistant turn; other server tools' blocks have no Gemini form."""
    if block["type"] == "server_tool_use":  # {id, name, input: {code}}
        code = (block.get("input") or {}).get("code")
        if block["name"] != "code_execution" or code is None:
            return []
        return [{"executableCode": {"language": "PYTHON", "code": code}}]
    result = block["content"]  # {tool_use_id, content: a result or an error}
    if result["type"] == "code_execution_result":  # {stdout, stderr, return_code}
        failed = result.get("return_code") != 0
        output = (result.get("stderr") if failed else result.get("stdout")) or ""
        return [{"codeExecutionResult": {"outcome": "OUTCOME_FAILED" if failed else "OUTCOME_OK",
                                         "output": output}}]
    if result["type"] == "code_execution_tool_result_error":  # {error_code}
        timed_out = result.get("error_code") == "execution_time_exceeded"
        return [{"codeExecutionResult": {
            "outcome": "OUTCOME_DEADLINE_EXCEEDED" if timed_out else "OUTCOME_FAILED",
            "output": result.get("error_code") or ""}}]
    return []  # encrypted_code_execution_result: only Anthropic can read it


def _tool_result_parts(
    block: dict, call: tuple | None, new_media: bool, where: str, key: bytes
) -> tuple:
    """Return (functionResponse part, parts to place after the responses) for a tool_result."""
    content = block.get("content")
    texts, media = [], []
    items = _blocks(content) if content else []
    for i, item in enumerate(items):
        kind = item["type"]
        if kind == "text":  # {text}
            texts.append(item.get("text") or "")
        elif kind == "tool_reference":  # {tool_name}: Claude Code's tool search loaded a tool
            texts.append(f"Tool {item.get('tool_name')} is now available to call.")
        elif kind in ("image", "document"):  # {source}
            for part in _media_parts(item, f"{where}.content.{i}", key):
                if "text" in part:
                    texts.append(part["text"])
                else:
                    media.append(part)
        else:
            texts.extend(part["text"] for part in _other_block_parts(item))
    text = "\n".join(texts)
    if call is None:  # no matching tool_use just before: keep the result as plain text
        return None, [{"text": f"[tool result {block.get('tool_use_id')}]\n{text}"}] + media
    name, call_id = call
    response = {"error": text} if block.get("is_error") else {"result": text}
    function_response = {"name": name, "response": response}
    if call_id:
        function_response["id"] = call_id
    if media and new_media and all(_part_mime(p) in FUNCTION_RESPONSE_MEDIA for p in media):
        function_response["parts"] = media
        media = []
    return {"functionResponse": function_response}, media


def _part_mime(part: dict) -> str:
    return (part.get("inlineData") or part.get("fileData") or {}).get("mimeType", "")


PREFILL_NOTE = "(Continue your answer from exactly where this text ends, without repeating it.)\n"


def _prefill_as_user(contents: list) -> bool:
    """Move a closing model turn of plain text (an assistant prefill) into the user turn before
    it, for models that refuse requests ending with a model turn; return True if it did."""
    last = contents[-1] if len(contents) > 1 else None
    if not last or last["role"] != "model" or contents[-2]["role"] != "user" or any(
        not isinstance(part.get("text"), str) or part.get("thought") for part in last["parts"]
    ):
        return False
    text = "".join(part["text"] for part in last["parts"])
    contents.pop()
    contents[-1]["parts"] = contents[-1]["parts"] + [{"text": PREFILL_NOTE + text}]
    return True


class _HistoryTranslator:
    """Walks the messages once, turning blocks into Gemini contents for one target model."""

    def __init__(self, model: str, signatures: SignatureStore, rules_model: str):
        self.model = model
        self.signatures = signatures
        self.new_media = _model_version(rules_model) >= (3, 0)
        self.prefill = _model_version(rules_model) < (3, 6)  # 3.6+ refuses a closing model turn
        self.dropped: dict = {}  # why signature carriers were not replayed -> how many
        self.contents: list = []
        self.notes: list = []  # an assistant message's system notes, for the user turn after it
        self.pending: OrderedDict = OrderedDict()  # tool_use id -> (gemini name, call id)

    def add(self, message: dict, where: str) -> None:
        role = message["role"]
        if role == "system":  # Claude Code puts role=system entries inside messages
            self._append("user", _system_note(message["content"]))
            return
        blocks = _blocks(message["content"])
        if role == "assistant":
            self._append("model", self._model_parts(blocks))
            notes, self.notes = self.notes, []
            self._append("user", notes)
        else:
            self._append("user", self._user_parts(blocks, where))

    def _append(self, role: str, parts: list) -> None:
        if not parts:
            return
        if self.contents and self.contents[-1]["role"] == role:
            self.contents[-1]["parts"].extend(parts)
        else:
            self.contents.append({"role": role, "parts": parts})

    def _model_parts(self, blocks: list) -> list:
        parts = []
        for block in blocks:
            kind = block["type"]
            if kind == "text":  # {text}
                if block.get("text"):  # without Gemini's text signature: see ResponseFold._part
                    parts.append({"text": block["text"]})
            elif kind == "thinking":  # {thinking, signature}: only Gemini's own, same model
                carried = self._carried(block.get("signature") or "")
                if carried and carried.model == self.model and carried.kind == KIND_THOUGHT:
                    parts.append({"text": block.get("thinking") or "", "thought": True,
                                  "thoughtSignature": carried.signature})
            elif kind == "tool_use":  # {id, name, input}
                parts.append(self._call_part(block))
            elif kind == "mid_conv_system":  # {content: [text]}: the model must not say it
                self.notes.extend(_system_note(block.get("content")))
            elif kind in ("server_tool_use", "code_execution_tool_result"):
                parts.extend(_code_execution_parts(block))  # the model's own runs, as it made them
            else:  # compaction, server artefacts, newer blocks
                parts.extend(_other_block_parts(block))
        return parts

    def _carried(self, token: str) -> Carried | None:
        """Return what a carrier holds, counting the ones that cannot be replayed here."""
        carried = self.signatures.resolve(token)
        if carried is None and len(token) >= CARRIER_MIN_CHARS:
            why = "bad MAC (another key, another client's id, or altered)"
        elif carried is not None and carried.model != self.model:
            why = f"issued by {carried.model}"
        else:
            return carried
        self.dropped[why] = self.dropped.get(why, 0) + 1
        return carried

    def _call_part(self, block: dict) -> dict:
        tool_id, name = block["id"], block["name"]
        args = block.get("input") or {}
        carried = self._carried(tool_id[6:]) if tool_id.startswith("toolu_") else None
        call = {"name": _gemini_tool_name(name), "args": args}
        if carried and carried.call_id:
            call["id"] = carried.call_id
        part = {"functionCall": call}
        if carried and carried.signature and carried.model == self.model:
            part["thoughtSignature"] = carried.signature
        self.pending[tool_id] = (call["name"], call.get("id", ""))
        return part

    def _user_parts(self, blocks: list, where: str) -> list:
        pending, self.pending = self.pending, OrderedDict()
        responses, parts, after = {}, [], []
        for i, block in enumerate(blocks):
            kind, here = block["type"], f"{where}.content.{i}"
            if kind == "text":  # {text}
                if block.get("text"):
                    parts.append({"text": block["text"]})
            elif kind in ("image", "document"):  # {source}
                parts.extend(_media_parts(block, here, self.signatures.key))
            elif kind == "tool_result":  # {tool_use_id, content, is_error}
                tool_id = block.get("tool_use_id")
                call = pending.get(tool_id) if tool_id not in responses else None
                response, extra = _tool_result_parts(
                    block, call, self.new_media, here, self.signatures.key
                )
                if response is None:
                    parts.extend(extra)
                else:
                    responses[tool_id] = response
                    after.extend(extra)
            elif kind == "mid_conv_system":  # {content: [text]}
                parts.extend(_system_note(block.get("content")))
            else:  # search_result, compaction, server artefacts, newer blocks
                parts.extend(_other_block_parts(block))
        # Gemini wants one response per call, in call order, before the turn's other parts.
        ordered = [
            responses.get(tool_id)
            or {
                "functionResponse": dict(
                    {"name": name, "response": {"error": "No result was recorded for this call."}},
                    **({"id": call_id} if call_id else {}),
                )
            }
            for tool_id, (name, call_id) in pending.items()
        ]
        return ordered + after + parts

    def finish(self) -> list:
        """Return the contents, with the bypass signature where Gemini 3 may require one."""
        if self.dropped:
            log.debug("signature carriers not replayed to %s: %s", self.model, ", ".join(
                f"{count} {why}" for why, count in self.dropped.items()))
        contents = self.contents
        if contents and contents[0]["role"] == "model":  # Gemini rejects history opening on a call
            contents.insert(0, {"role": "user", "parts": [{"text": "(continued conversation)"}]})
        if not self.prefill:
            _prefill_as_user(contents)
        for content in contents:  # parts of consecutive same-role messages: responses first
            if content["role"] == "user" and len(content["parts"]) > 1:
                content["parts"].sort(key=lambda part: "functionResponse" not in part)
        # Gemini validates only the current turn, but a turn's bytes must not change once a later
        # turn begins (the implicit cache needs a byte-equal prefix): every turn gets the bypass.
        for content in contents:
            if content["role"] == "model":
                for part in content["parts"]:
                    if "functionCall" in part:
                        part.setdefault("thoughtSignature", BYPASS_SIGNATURE)
                        break
        return contents


def _tool_changes(messages: list):
    """Yield (tool reference, True to offer / False to withdraw) in conversation order, from a
    validated body (TOOL_CHANGE_TARGETS)."""
    for message in messages:
        content = message["content"]
        for block in content if isinstance(content, list) else ():
            kind = block["type"]
            if kind == "tool_result" and isinstance(block.get("content"), list):
                for item in block["content"]:  # Claude Code's tool search loaded a tool
                    if item["type"] == "tool_reference":
                        yield {"type": "tool_reference", "name": item["tool_name"]}, True
            elif kind in ("tool_addition", "tool_removal"):
                yield block["tool"], kind == "tool_addition"
            elif kind == "compaction" and block.get("tool_changes"):
                yield from _tool_changes([{"content": block["tool_changes"]}])


def _offered_tools(tools: list, messages: list) -> tuple:
    """Return (name -> offered now, the request's tools plus inline definitions) after the
    history's tool changes: the last change of a tool wins."""
    tools = list(tools)
    names = [tool["name"] for tool in tools]
    offered = {}
    for ref, offer in _tool_changes(messages):
        kind = ref["type"]
        if kind == "tool_definition":  # {definition: a tools entry} (inline-tools beta)
            definition = ref["definition"]
            if definition["name"] not in names:
                tools.append(definition)
                names.append(definition["name"])
            changed = [definition["name"]]
        elif kind == "mcp_tool_reference":  # {server_name, name}: Claude Code's mcp__s__t
            changed = [f"mcp__{ref['server_name']}__{ref['name']}"]
        elif kind == "mcp_toolset_reference":  # {server_name}: all of that server's tools
            prefix = f"mcp__{ref['server_name']}__"
            changed = [name for name in names if name.startswith(prefix)]
        elif kind == "tool_reference":  # {name}
            changed = [ref["name"]]
        else:  # a newer kind of reference: nothing this proxy can declare
            changed = []
        offered.update(dict.fromkeys(changed, offer))
    return offered, tools


def _function_declarations(tools: list, messages: list) -> tuple:
    """Return (declarations, gemini->client names, server tools by name) for a tools list."""
    declarations, names, server_tools, later = [], {}, {}, {}
    client_names = {t.get("name") for t in tools if isinstance(t, dict)}
    offered, tools = _offered_tools(tools, messages)
    for tool in tools:  # validated, or an inline definition with a string name
        if not offered.get(tool["name"], not tool.get("defer_loading")):
            continue  # deferred until a tool_reference or tool_addition, or removed since
        kind = tool.get("type")
        if kind and kind != "custom" and "input_schema" not in tool:  # server or typed tool
            server_tools[tool["name"]] = tool
        elif offered.get(tool["name"]) and (
            tool.get("defer_loading") or tool["name"] not in client_names
        ):  # loaded by tool search or a tool_addition, or defined inline
            later[tool["name"]] = tool
        else:
            declarations.append(_declaration(tool, names))
    # Tools the history offered go last, in the order it offered them: the list only grows at
    # its end as the conversation goes on, so more of each prompt matches the one before.
    for name in offered:
        if name in later:
            declarations.append(_declaration(later.pop(name), names))
    if len(declarations) > GEMINI_DECLARATION_LIMIT:
        raise _bad_request(f"tools: Gemini accepts at most {GEMINI_DECLARATION_LIMIT} tools, "
                          f"this request has {len(declarations)}")
    return declarations, names, server_tools


def _declaration(tool: dict, names: dict) -> dict:
    """Return the functionDeclaration of a client tool, noting its Gemini name in `names`."""
    schema = tool.get("input_schema")
    schema = schema if isinstance(schema, dict) else {"type": "object", "properties": {}}
    if "$schema" in schema:  # the one keyword parametersJsonSchema rejects
        schema = {k: v for k, v in schema.items() if k != "$schema"}
    gemini_name = _gemini_tool_name(tool["name"])
    names[gemini_name] = tool["name"]
    return {"name": gemini_name, "description": tool.get("description") or "",
            "parametersJsonSchema": schema}


# A tool schema Gemini rejects is retried reduced to Gemini's `parameters` Schema, an OpenAPI 3.0
# subset: one type per schema, string-only enums, `anyOf` alone, no refs. The rest is described.
SCHEMA_TYPE_KEYS = {
    "string": ("format", "enum", "minLength", "maxLength", "pattern"),
    "number": ("format", "minimum", "maximum"),
    "integer": ("format", "minimum", "maximum"),
    "boolean": (),
    "array": ("minItems", "maxItems"),
    "object": ("minProperties", "maxProperties"),
}
SCHEMA_COMMON_KEYS = ("title", "description", "default", "example")
# Handled by _SchemaReducer itself, or dropped without a word: annotations and "no extras" rules.
SCHEMA_QUIET_KEYS = frozenset((
    "type", "nullable", "items", "properties", "required", "propertyOrdering", "anyOf", "oneOf",
    "allOf", "$ref", "const", "$schema", "$id", "$comment", "$anchor", "$defs", "definitions",
    "additionalProperties", "unevaluatedProperties", "deprecated", "readOnly", "writeOnly",
    "examples", "strict",
))
SCHEMA_MAX_DEPTH = 12
SCHEMA_NOTES_SHOWN = 12


class _SchemaReducer:
    """Reduces one JSON Schema to Gemini's `parameters` Schema, noting what it had to leave out."""

    def __init__(self, root: dict):
        self.definitions = {}
        for key in ("$defs", "definitions"):
            if isinstance(root.get(key), dict):
                self.definitions.update({f"#/{key}/{n}": s for n, s in root[key].items()})
        self.notes: list = []
        self.expanding: list = []  # $refs being expanded: a cycle stops at the second visit

    def reduce(self, schema, path: str, depth: int = 0) -> dict | None:
        """Return the Gemini Schema for `schema`, or None when it cannot be declared."""
        if not isinstance(schema, dict) or not schema.keys() & _SCHEMA_SHAPES:
            what = "no value" if schema is False else "any JSON value"
            self.notes.append(f"`{path}`: {what}")
            return None
        if depth > SCHEMA_MAX_DEPTH:
            self.notes.append(f"`{path}`: nested too deeply to declare")
            return None
        if isinstance(schema.get("$ref"), str):
            return self._ref(schema, path, depth)
        if isinstance(schema.get("allOf"), list):
            schema = _merge_all_of(schema)
        branches = schema.get("anyOf", schema.get("oneOf"))
        if isinstance(branches, list):
            return self._any_of(schema, branches, path, depth)
        types, nullable = _schema_types(schema)
        if not types:
            self.notes.append(f"`{path}`: {_short_json(schema)}")
            return None
        if len(types) > 1:  # one branch per type, each with only its own keywords
            branches = [dict(schema, type=kind) for kind in types]
            return self._any_of({"nullable": nullable}, branches, path, depth)
        reduced = self._typed(schema, types[0], path, depth)
        if reduced is not None and nullable:
            reduced["nullable"] = True
        return reduced

    def _ref(self, schema: dict, path: str, depth: int) -> dict | None:
        ref = schema["$ref"]
        target = self.definitions.get(ref)
        if target is None or ref in self.expanding:
            why = "refers to itself" if ref in self.expanding else "unresolved reference"
            self.notes.append(f"`{path}`: {why} {ref}")
            return None
        self.expanding.append(ref)
        try:
            merged = dict(target) if isinstance(target, dict) else {"type": "object"}
            merged.update((k, v) for k, v in schema.items() if k != "$ref")
            return self.reduce(merged, path, depth + 1)
        finally:
            self.expanding.pop()

    def _any_of(self, schema: dict, branches: list, path: str, depth: int) -> dict | None:
        nullable = bool(schema.get("nullable"))
        reduced = []
        for branch in branches:
            if isinstance(branch, dict) and branch.get("type") == "null":
                nullable = True
                continue
            branch = self.reduce(branch, path, depth + 1)
            if branch is not None:
                reduced.append(branch)
        for branch in reduced:  # anyOf must be the only field: the rest goes into each branch
            if nullable:
                branch["nullable"] = True
            if isinstance(schema.get("description"), str):
                branch.setdefault("description", schema["description"])
        if len(reduced) < 2:
            return reduced[0] if reduced else None
        return {"anyOf": reduced}

    def _typed(self, schema: dict, kind: str, path: str, depth: int) -> dict | None:
        reduced = {"type": kind}
        for key in SCHEMA_COMMON_KEYS:
            if key in schema:
                reduced[key] = schema[key]
        if "example" not in reduced and isinstance(schema.get("examples"), list):
            reduced.update({"example": value for value in schema["examples"][:1]})
        for key, value in schema.items():
            if key in SCHEMA_TYPE_KEYS[kind] and key != "enum":
                reduced[key] = value
            elif key not in SCHEMA_QUIET_KEYS and key not in SCHEMA_COMMON_KEYS and key != "enum":
                self.notes.append(f"`{path}`: {key} {_short_json(value)}")
        enum = schema.get("enum", [schema["const"]] if "const" in schema else None)
        if isinstance(enum, list):
            self._enum(reduced, [v for v in enum if v is not None], path)
            if None in enum:
                reduced["nullable"] = True
        if kind == "array":
            items = schema.get("items")
            if isinstance(items, dict) and items.keys() & _SCHEMA_SHAPES:
                reduced["items"] = self.reduce(items, f"{path}[]", depth + 1)
                if reduced["items"] is None:
                    return None
            else:  # Gemini: "items: missing field"; any item becomes text
                reduced["items"] = {"type": "string"}
        elif kind == "object":
            return self._object(schema, reduced, path, depth)
        return reduced

    def _enum(self, reduced: dict, values: list, path: str) -> None:
        if reduced["type"] == "string" and all(isinstance(v, str) for v in values):
            reduced["enum"] = values
        else:
            self.notes.append(f"`{path}`: one of {', '.join(_short_json(v) for v in values)}")

    def _object(self, schema: dict, reduced: dict, path: str, depth: int) -> dict | None:
        properties = {}
        given = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        for name, sub in given.items():
            sub = self.reduce(sub, f"{path}.{name}" if path else name, depth + 1)
            if sub is not None:
                properties[name] = sub
        if not properties:  # Gemini: "properties: should be non-empty for OBJECT type"
            if path and not given:
                self.notes.append(f"`{path}`: an object with any keys")
            return reduced if not path else None
        reduced["properties"] = properties
        for key in ("required", "propertyOrdering"):
            names = [n for n in schema.get(key) or () if n in properties]
            if names:
                reduced[key] = names
        return reduced


# Keywords that say what a value is; a schema with none of them allows any value.
_SCHEMA_SHAPES = frozenset(("type", "$ref", "anyOf", "oneOf", "allOf", "properties", "items",
                            "enum", "const"))


def _schema_types(schema: dict) -> tuple:
    """Return (the schema's Gemini types, whether null is allowed), inferring a missing type."""
    kinds = schema.get("type")
    kinds = list(kinds) if isinstance(kinds, list) else [kinds] if kinds else []
    if not kinds:
        enum = schema.get("enum", [schema.get("const")])
        kinds = ["object"] if "properties" in schema else ["array"] if "items" in schema else [
            "string" if all(isinstance(v, str) or v is None for v in enum or ()) else "number"]
    nullable = "null" in kinds or bool(schema.get("nullable"))
    return [k for k in kinds if k in SCHEMA_TYPE_KEYS], nullable


def _merge_all_of(schema: dict) -> dict:
    """Return `schema` with its allOf members merged in (properties and required united)."""
    merged = {k: v for k, v in schema.items() if k != "allOf"}
    for member in schema["allOf"]:
        for key, value in (member.items() if isinstance(member, dict) else ()):
            if key == "properties" and isinstance(value, dict):
                merged["properties"] = dict(merged.get("properties") or {}, **value)
            elif key == "required" and isinstance(value, list):
                merged["required"] = list(merged.get("required") or ()) + value
            else:
                merged.setdefault(key, value)
    return merged


def _short_json(value) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text if len(text) <= 60 else text[:57] + "..."


def _reduce_tool_schema(schema: dict) -> tuple:
    """Return (Gemini `parameters` Schema, or None for no parameters; notes on what was left)."""
    reducer = _SchemaReducer(schema)
    parameters = reducer.reduce(dict(schema, type="object"), "")
    return parameters if parameters and "properties" in parameters else None, reducer.notes


def _repaired_declaration(declaration: dict) -> dict:
    """Return a function declaration with its schema reduced to Gemini's `parameters` Schema."""
    parameters, notes = _reduce_tool_schema(declaration.get("parametersJsonSchema") or {})
    description = declaration.get("description") or ""
    if notes:
        shown = "; ".join(notes[:SCHEMA_NOTES_SHOWN])
        if len(notes) > SCHEMA_NOTES_SHOWN:
            shown += f"; and {len(notes) - SCHEMA_NOTES_SHOWN} more"
        description += f"\n\n(Input schema simplified for Gemini; not declared: {shown}.)"
    repaired = {"name": declaration["name"], "description": description.strip()}
    if parameters:
        repaired["parameters"] = parameters
    return repaired


def _thinking_config(body: dict, model: str) -> tuple:
    """Return (thinkingConfig or None, thinking display) for the client's thinking request."""
    thinking = body.get("thinking") or {}
    kind = thinking.get("type")
    if kind not in ("enabled", "adaptive"):  # disabled, or absent as on Claude Code's helper
        return _least_thinking(model), ""  # calls, whose effort asks for nothing to be thought
    effort = (body.get("output_config") or {}).get("effort")
    legacy = _model_version(model) < (3, 0)
    budget_cap = 32768 if "pro" in model else 24576
    config = {}
    if kind == "enabled" and isinstance(thinking.get("budget_tokens"), int):
        budget = thinking["budget_tokens"]
        if legacy:
            config["thinkingBudget"] = min(budget, budget_cap)
        else:
            config["thinkingLevel"] = (
                "LOW" if budget <= 4096 else "MEDIUM" if budget <= 16384 else "HIGH"
            )
    elif effort in EFFORT_LEVELS:
        if legacy:
            config["thinkingBudget"] = min(EFFORT_BUDGETS[effort], budget_cap)
        else:
            config["thinkingLevel"] = EFFORT_LEVELS[effort]
    config["includeThoughts"] = True
    return config, "omitted" if thinking.get("display") == "omitted" else "summarized"


def _least_thinking(model: str) -> dict | None:
    """Return the thinkingConfig for the least thinking a model allows (None: it cannot think)."""
    if not MODEL_VERSION_RE.match(model) or _model_version(model) < (2, 5):
        return None
    if _model_version(model) < (3, 0):
        return {"thinkingBudget": 128 if "pro" in model else 0}
    return {"thinkingLevel": _lowest_level(model)}


def _lowest_level(model: str) -> str:
    """Return the least thinking a Gemini 3+ model allows (MINIMAL exists on early Flash only)."""
    return "MINIMAL" if "flash" in model and _model_version(model) < (3, 7) else "LOW"


def _generation_config(body: dict, model: str, config: Config, model_info: dict) -> dict:
    max_tokens = body.get("max_tokens")
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max(1, max_tokens)
    limit = model_info.get("outputTokenLimit")
    limit = limit if isinstance(limit, int) and limit > 0 else config.max_output_tokens
    generation = {"maxOutputTokens": min(max_tokens, config.max_output_tokens, limit)}
    # No stopSequences: Gemini would not say which one it stopped on, so the response side
    # cuts every one and reports it (ResponseFold._text), reading the answer as a stream.
    if _model_version(model) < (3, 6):  # 3.6+ ignores or rejects custom sampling values
        for ours, theirs in (("temperature", "temperature"), ("top_p", "topP"), ("top_k", "topK")):
            if body.get(ours) is not None:
                generation[theirs] = body[ours]
    output_format = (body.get("output_config") or {}).get("format")
    if isinstance(output_format, dict) and output_format.get("type") == "json_schema":
        schema = output_format.get("schema")
        generation["responseMimeType"] = "application/json"
        if isinstance(schema, dict):
            generation["responseJsonSchema"] = {k: v for k, v in schema.items() if k != "$schema"}
    return generation


# Anthropic server tools Gemini runs itself, by tool type prefix, and what the model is told
# (Gemini's built-ins have no domain filters or use limits, so filters become instructions).
BUILTIN_TOOLS = {"web_search": "googleSearch", "web_fetch": "urlContext",
                 "code_execution": "codeExecution"}
BUILTIN_PROMPTS = {"web_search": "Search the web with Google Search to answer.",
                   "web_fetch": "Read the web pages the conversation names with URL context.",
                   "code_execution": ""}


def _builtin_prompt(kind: str, tool: dict) -> str:
    lines = [BUILTIN_PROMPTS[kind]] if BUILTIN_PROMPTS[kind] else []
    if tool.get("allowed_domains"):
        lines.append(
            "Use only results from these domains: " + ", ".join(tool["allowed_domains"]) + "."
        )
    if tool.get("blocked_domains"):
        lines.append("Never use results from: " + ", ".join(tool["blocked_domains"]) + ".")
    return " ".join(lines)


def _builtin_tools(server_tools: dict, declarations: list, choice: dict, model: str) -> dict:
    """Return {kind: client tool} for the server tools Gemini runs in this request."""
    builtins = {}
    for tool in server_tools.values():
        for kind in BUILTIN_TOOLS:
            if str(tool.get("type")).startswith(kind + "_"):
                builtins[kind] = tool
    forced = [kind for kind, tool in builtins.items() if tool["name"] == choice.get("name")]
    if forced:  # tool_choice names a server tool: it alone runs
        builtins = {forced[0]: builtins[forced[0]]}
    elif declarations and _model_version(model) < (3, 0):
        builtins = {}  # Gemini 2.x: "Tool use with function calling is unsupported"
    left_out = set(server_tools) - {tool["name"] for tool in builtins.values()}
    if left_out:
        log.debug("server tools left out (Gemini cannot run them here): %s",
                  ", ".join(sorted(left_out)))
    return builtins


def _tool_fields(builtins: dict, declarations: list, choice: dict, names: dict) -> dict:
    """Return the tools and toolConfig fields of the Gemini body."""
    forced = any(tool["name"] == choice.get("name") for tool in builtins.values())
    functions = bool(declarations) and not forced
    tools = [{"functionDeclarations": declarations}] if functions else []
    tools.extend({BUILTIN_TOOLS[kind]: {}} for kind in BUILTIN_TOOLS if kind in builtins)
    fields = {"tools": tools} if tools else {}
    if functions:
        fields["toolConfig"] = {"functionCallingConfig": _function_calling(choice, names)}
        if builtins:  # Gemini 3 runs both once asked to
            fields["toolConfig"]["includeServerSideToolInvocations"] = True
    return fields


def _function_calling(choice: dict, names: dict) -> dict:
    """Return Gemini's functionCallingConfig for an Anthropic tool_choice."""
    calling = {"mode": TOOL_CHOICE_MODES.get(choice.get("type"), "AUTO")}
    if choice.get("type") == "tool":
        wanted = _gemini_tool_name(str(choice.get("name")))
        if wanted in names:
            calling["allowedFunctionNames"] = [wanted]
        else:  # a forced tool Gemini does not have must not become a 400
            calling["mode"] = "AUTO"
    return calling


def to_gemini_request(body: dict, config: Config, signatures: SignatureStore, model: str = "",
                      rules_model: str = "", model_info: dict | None = None) -> GeminiRequest:
    """Return the Gemini request for an Anthropic Messages body; raise ProxyError when invalid.

    `model` overrides the routing (a fallback); `rules_model` is the model known to serve it
    (Gemini's modelVersion), whose rules apply; `model_info` is that model's entry in Gemini's
    model list (token limits, whether it thinks)."""
    _validate_body(body)
    model = model or map_model(body["model"], config)
    rules = rules_model or model
    history = _HistoryTranslator(model, signatures, rules)
    for i, message in enumerate(body["messages"]):
        history.add(message, f"messages.{i}")
    contents = history.finish()
    if not contents:
        raise _bad_request("messages: at least one message with content is required")
    system = _texts(body["system"]) if body.get("system") else []
    model_tools, names, builtins = _gemini_tools(body, model)
    system.extend(filter(None, (_builtin_prompt(kind, tool) for kind, tool in builtins.items())))
    # What stays the same from turn to turn comes first and contents last, so each turn's body
    # starts with the bytes of the one before (Gemini's implicit cache wants an equal prefix).
    gemini_body = {}
    if system:
        gemini_body["systemInstruction"] = {"parts": [{"text": text} for text in system]}
    gemini_body.update(model_tools)
    generation = _generation_config(body, rules, config, model_info or {})
    thinking_config, thinking = _thinking_config(body, rules)
    if (model_info or {}).get("thinking") is False:  # the model list says it cannot think
        thinking_config, thinking = None, ""
    if thinking_config:
        generation["thinkingConfig"] = thinking_config
    gemini_body["generationConfig"] = generation
    gemini_body["safetySettings"] = SAFETY_OFF
    gemini_body["contents"] = contents
    return GeminiRequest(client_model=body["model"], model=model, body=gemini_body,
                         stream=bool(body.get("stream")), tool_names=names,
                         stop_sequences=tuple(body.get("stop_sequences") or ()),
                         thinking=thinking, server_tools=builtins)


def _gemini_tools(body: dict, model: str) -> tuple:
    """Return ({tools, toolConfig}, gemini->client names, {kind: server tool Gemini runs})."""
    declarations, names, server_tools = _function_declarations(
        body.get("tools") or [], body["messages"]
    )
    choice = body.get("tool_choice") or {}
    builtins = _builtin_tools(server_tools, declarations, choice, model)
    return _tool_fields(builtins, declarations, choice, names), names, builtins


# == Response: Gemini -> Anthropic ============================================
# ResponseFold folds Gemini chunks (a stream, or one chunk for generateContent) into
# Anthropic SSE events and the final message: one set of rules for both modes.

STOP_REASONS = {  # every FinishReason of Gemini's API (google-genai 3.4), Vertex's too
    "STOP": "end_turn",
    "MAX_TOKENS": "max_tokens",
    "CONTINUATION": "max_tokens",  # long-decode models: this request's output cap, more to come
    "OTHER": "end_turn",
    "FINISH_REASON_UNSPECIFIED": "end_turn",
    "TOO_MANY_TOOL_CALLS": "end_turn",
    "MALFORMED_FUNCTION_CALL": "end_turn",  # after text that reached the client, with a note
    "UNEXPECTED_TOOL_CALL": "end_turn",
    "MALFORMED_RESPONSE": "end_turn",
    "MISSING_THOUGHT_SIGNATURE": None,  # the request's fault: a 400 (ResponseFold._stop_reason)
    "SAFETY": "refusal",
    "PROHIBITED_CONTENT": "refusal",
    "BLOCKLIST": "refusal",
    "SPII": "refusal",
    "RECITATION": "refusal",
    "LANGUAGE": "refusal",
    "IMAGE_SAFETY": "refusal",
    "IMAGE_PROHIBITED_CONTENT": "refusal",
    "IMAGE_RECITATION": "refusal",
    "IMAGE_OTHER": "refusal",
    "NO_IMAGE": "refusal",
    "ESCALATION": "refusal",
    "PUP_LIMITED_DISABLED": "refusal",
    "MODEL_ARMOR": "refusal",
    "JAILBREAK": "refusal",
}
BYTES_PER_TOKEN = 4  # for estimates, before (or without) Gemini's own count
# Worth one more upstream call while nothing but thinking has reached the client; so is an
# answer without content that ended with STOP, OTHER or a reason this table does not know.
RETRY_FINISH_REASONS = ("MALFORMED_FUNCTION_CALL", "UNEXPECTED_TOOL_CALL", "MALFORMED_RESPONSE")
EMPTY_RETRY_REASONS = RETRY_FINISH_REASONS + (None, "STOP", "OTHER", "FINISH_REASON_UNSPECIFIED")


def _log_refusal(what: str, reason: str, rated: dict) -> None:
    """Log at DEBUG why Gemini refused: the reason and the safety categories it rated high."""
    ratings = rated.get("safetyRatings") if isinstance(rated, dict) else None
    categories = [r.get("category") for r in ratings or () if isinstance(r, dict) and (
        r.get("blocked") or r.get("probability") in ("MEDIUM", "HIGH"))]
    log.debug("Gemini %s: %s (safety categories: %s)", what, reason,
              ", ".join(map(str, categories)) or "none named")


def _sse_frame(event: str, data: dict) -> bytes:
    """Return one Anthropic SSE event as bytes."""
    return b"event: %s\ndata: %s\n\n" % (event.encode(), json.dumps(data, separators=(",", ":"),
                                                                   ensure_ascii=False).encode())


class ResponseFold:
    """Fold Gemini chunks into Anthropic events (feed/finish) and the final message()."""

    def __init__(self, request: GeminiRequest, signatures: SignatureStore):
        self.request = request
        self.signatures = signatures
        self.id = "msg_" + secrets.token_hex(12)
        # Until Gemini counts: from the Gemini body, the same for a stream and a non-stream call.
        self.input_estimate = len(request.payload()) // BYTES_PER_TOKEN
        self.blocks: list = []  # content blocks of the final message
        # A stream's text is not kept: only a non-stream message (or citations) needs it.
        self.keep_text = not request.stream or request.whole_answer
        self.pieces: list = []  # text pieces of the open text/thinking block
        self.open_kind = ""  # "text" or "thinking" while such a block is open
        self.held = ""  # text held back while it could still be the start of a stop sequence
        self.stops = _StopSequences(request.stop_sequences) if request.stop_sequences else None
        self.stop_reason = None
        self.stop_sequence = None
        self.finish_reason = None
        self.finish_message = ""
        self.partial = None  # a Vertex function call still arriving in pieces
        self.blocked = None
        self.saw_candidate = False
        self.called_tool = False
        self.search_requests = 0
        self.fetch_requests = 0
        self.code_uses: dict = {}  # Gemini's executableCode id ("" for the latest) -> block id
        self.citations: list = []  # Google Search citations not yet placed on a text block
        self.usage_metadata: dict = {}
        self.done = False  # a stop sequence matched: read no further
        self.model_version = ""  # the model Gemini says served the answer

    def start(self) -> list:
        """Return the message_start event."""
        message = {"id": self.id, "type": "message", "role": "assistant",
                   "model": self.request.client_model, "content": [], "stop_reason": None,
                   "stop_sequence": None, "usage": dict(self.usage(), output_tokens=1)}
        return [("message_start", {"type": "message_start", "message": message})]

    def feed(self, chunk) -> list:
        """Return the events for one Gemini chunk; raise ProxyError for an error chunk."""
        problem = _shape_problem(chunk, GEMINI_CHUNK)
        if problem:
            raise ProxyError(502, "api_error", f"Gemini sent an answer the proxy could not read "
                             f"({problem[:200]})")
        if chunk.get("error") is not None:
            error = chunk["error"]
            raise _upstream_error(error.get("code") or 500, json.dumps({"error": error}).encode())
        events = []
        if chunk.get("usageMetadata"):
            self.usage_metadata = chunk["usageMetadata"]  # cumulative: the last one wins
        if isinstance(chunk.get("modelVersion"), str):
            self.model_version = chunk["modelVersion"]
        block_reason = (chunk.get("promptFeedback") or {}).get("blockReason")
        if block_reason:
            self.blocked = block_reason
            _log_refusal("blocked the prompt", block_reason, chunk["promptFeedback"])
        candidates = chunk.get("candidates")
        if not candidates or not isinstance(candidates[0], dict):
            return events
        candidate = candidates[0]
        self.saw_candidate = True
        self._metadata_blocks(candidate, events)
        for part in (candidate.get("content") or {}).get("parts") or ():
            if self.done:
                break
            if isinstance(part, dict):
                self._part(part, events)
        if candidate.get("finishReason"):
            self.finish_reason = candidate["finishReason"]
            self.finish_message = candidate.get("finishMessage") or ""
            if STOP_REASONS.get(self.finish_reason) == "refusal":
                _log_refusal("stopped", self.finish_reason, candidate)
        return events

    def retryable(self) -> bool:
        """Return True when the answer ended empty (thinking aside): worth one more call."""
        if self.blocked or self.done or self.called_tool or self._shown():
            return False
        return self._ended_empty()

    def _shown(self) -> bool:
        """Return True once anything but thinking reached (or waits for) the client."""
        return bool(self.held) or any(block["type"] != "thinking" for block in self.blocks)

    def _ended_empty(self) -> bool:
        reason = self.finish_reason
        return reason in EMPTY_RETRY_REASONS or reason not in STOP_REASONS

    def next_attempt(self) -> None:
        self.finish_reason, self.finish_message = None, ""
        self.saw_candidate = False

    def finish(self) -> list:
        """Return the closing events; raise ProxyError when Gemini's answer was unusable."""
        events = []
        if self.partial is not None:  # the stream ended inside a call: keep what came
            self._call({}, None, events)
        self._flush_held(events)
        if self.stop_reason is None:
            self.stop_reason = self._stop_reason(events)
        self._close(events)
        delta = {"stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence}
        events.append(
            ("message_delta", {"type": "message_delta", "delta": delta, "usage": self.usage()})
        )
        events.append(("message_stop", {"type": "message_stop"}))
        return events

    def _stop_reason(self, events: list) -> str:
        if self.blocked:
            return "refusal"
        if self.called_tool:
            return "tool_use"
        if not self.saw_candidate:
            raise ProxyError(502, "api_error", "Gemini returned no candidates")
        reason = self.finish_reason
        if reason is None:
            raise ProxyError(502, "api_error", "Gemini's answer ended without a finish reason")
        if reason == "MISSING_THOUGHT_SIGNATURE":
            raise _bad_request("messages: Gemini refused the history: a function call in it has "
                              "no thought signature (MISSING_THOUGHT_SIGNATURE); replay the "
                              "tool_use blocks exactly as the proxy returned them")
        if not self._shown() and self._ended_empty():  # also after the retry
            said = f": {self.finish_message[:500]}" if self.finish_message else ""
            raise ProxyError(502, "api_error", f"Gemini's answer was empty twice (finish "
                             f"reason {reason}{said})", {"x-should-retry": "true"})
        if reason in RETRY_FINISH_REASONS:
            self._emit_text(f"\n\n[proxy: Gemini ended with {reason}; its tool call "
                            "was lost. Ask again to retry.]", events)
        elif reason not in STOP_REASONS:
            log.debug("Gemini finished with a reason this proxy does not know: %r", reason)
        return STOP_REASONS.get(reason) or "end_turn"

    def usage(self) -> dict:
        """Return Anthropic usage from the latest Gemini usageMetadata (see the README)."""
        meta = self.usage_metadata
        cached = _token_count(meta, "cachedContentTokenCount")
        thoughts = _token_count(meta, "thoughtsTokenCount")
        usage = {
            "input_tokens": (
                _token_count(meta, "promptTokenCount") - cached
                + _token_count(meta, "toolUsePromptTokenCount")
            ) if meta else self.input_estimate,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached,
            "output_tokens": _token_count(meta, "candidatesTokenCount") + thoughts,
            "output_tokens_details": {"thinking_tokens": thoughts},
        }
        if self.search_requests or self.fetch_requests:
            usage["server_tool_use"] = {"web_search_requests": self.search_requests,
                                        "web_fetch_requests": self.fetch_requests}
        return usage

    def prompt_tokens(self) -> int:
        """Return Gemini's prompt count (cached tokens included), 0 before it counted."""
        return _token_count(self.usage_metadata, "promptTokenCount")

    def message(self) -> dict:
        """Return the non-stream Message (after finish())."""
        return {"id": self.id, "type": "message", "role": "assistant",
                "model": self.request.client_model, "content": self.blocks,
                "stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence,
                "usage": self.usage()}

    # -- parts ----------------------------------------------------------------

    def _part(self, part: dict, events: list) -> None:
        signature = part.get("thoughtSignature")
        if part.get("functionCall") is not None:  # {functionCall: {id?, name, args}, ...}
            self._call(part["functionCall"], signature, events)
        elif part.get("thought"):  # {text, thought: true, thoughtSignature?}
            if not self.request.thinking:
                return
            if part.get("text") and self.request.thinking == "summarized":
                self._open("thinking", events)
                self._delta(part["text"], events)
            if signature:
                self._sign(signature, events)
        elif part.get("text"):  # {text, thoughtSignature?}
            # A text part's signature is dropped: no field Claude Code keeps can carry it (a block
            # after the text would become the reply it shows), Gemini does not check it, and held
            # in one instance's memory it made the replayed history differ between instances.
            self._text(part["text"], events)
        elif "executableCode" in part:  # {executableCode: {language, code, id?}}
            self._code(part["executableCode"], events)
        elif "codeExecutionResult" in part:  # {codeExecutionResult: {outcome, output, id?}}
            self._code_result(part["codeExecutionResult"], events)
        elif {"inlineData", "fileData", "functionResponse"} & set(part):
            self._unrelayable(part, events)
        elif set(part) - {"thoughtSignature", "text"}:  # toolCall/toolResponse: built-in records
            log.debug("Gemini part not relayed: %s", ", ".join(sorted(part)))

    def _open(self, kind: str, events: list) -> None:
        if self.open_kind == kind:
            return
        self._close(events)
        block = {"type": "text", "text": ""} if kind == "text" else \
            {"type": "thinking", "thinking": "", "signature": ""}
        events.append(
            (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": len(self.blocks),
                    "content_block": dict(block),
                },
            )
        )
        self.blocks.append(block)
        self.open_kind = kind

    def _delta(self, text: str, events: list) -> None:
        if self.open_kind == "text":
            delta = {"type": "text_delta", "text": text}
        else:
            delta = {"type": "thinking_delta", "thinking": text}
        events.append(("content_block_delta", {"type": "content_block_delta",
                                               "index": len(self.blocks) - 1, "delta": delta}))
        if self.keep_text:
            self.pieces.append(text)

    def _close(self, events: list) -> None:
        if not self.open_kind:
            return
        block = self.blocks[-1]
        block[self.open_kind] = "".join(self.pieces)
        if self.open_kind == "text" and self.citations:
            self._cite(block, events)
        self.pieces = []
        self.open_kind = ""
        events.append(
            ("content_block_stop", {"type": "content_block_stop", "index": len(self.blocks) - 1})
        )

    def _sign(self, signature: str, events: list) -> None:
        """Close a thinking block (opened if need be) with a carrier for a thought's signature."""
        self._open("thinking", events)
        token = self.signatures.issue(Carried(self.request.model, KIND_THOUGHT, "", signature))
        self.blocks[-1]["signature"] = token
        events.append(
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": len(self.blocks) - 1,
                    "delta": {"type": "signature_delta", "signature": token},
                },
            )
        )
        self._close(events)

    def _text(self, text: str, events: list) -> None:
        if self.stops is None:
            self._emit_text(text, events)
            return
        text = self.held + text
        cut, matched = self.stops.scan(text, len(self.held))
        self._emit_text(text[:cut], events)
        self.held = "" if matched else text[cut:]
        if matched:
            self.stop_reason, self.stop_sequence, self.done = "stop_sequence", matched, True

    def _emit_text(self, text: str, events: list) -> None:
        if text:
            self._open("text", events)
            self._delta(text, events)

    def _flush_held(self, events: list) -> None:
        held, self.held = self.held, ""
        self._emit_text(held, events)

    def _call(self, call: dict, signature: str | None, events: list) -> None:
        if self.partial is not None or "partialArgs" in call or call.get("willContinue"):
            self.partial = self.partial or _PartialCall()
            if self.partial.add(call, signature):  # more pieces follow (Vertex)
                return
            call, signature, self.partial = self.partial.call(), self.partial.signature, None
        if not call.get("name"):
            log.debug("Gemini sent a function call without a name; it is left out")
            return
        self._flush_held(events)
        self._close(events)
        call_id = str(call.get("id") or "")
        if signature or call_id:
            carried = Carried(self.request.model, KIND_CALL, call_id, signature or "")
            tool_id = "toolu_" + self.signatures.issue(carried)
        else:
            tool_id = "toolu_" + secrets.token_urlsafe(18)
        name = self.request.tool_names.get(call.get("name"), call.get("name") or "")
        args = call.get("args") if isinstance(call.get("args"), dict) else {}
        self._whole_block(
            {"type": "tool_use", "id": tool_id, "name": name, "input": {}}, args, events
        )
        self.called_tool = True

    def _whole_block(self, block: dict, input_json, events: list) -> None:
        """Emit a block that arrives complete: start, its input as one JSON delta, stop."""
        index = len(self.blocks)
        events.append(("content_block_start", {"type": "content_block_start", "index": index,
                                               "content_block": block}))
        if input_json is not None:
            events.append(
                (
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {
                            "type": "input_json_delta",
                            "partial_json": json.dumps(input_json, ensure_ascii=False),
                        },
                    },
                )
            )
            block = dict(block, input=input_json)
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
        self.blocks.append(block if self.keep_text else {"type": block["type"]})

    def _cite(self, block: dict, events: list) -> None:
        """Put the citations whose cited text this block holds on it (citations_delta)."""
        cited = [c for c in self.citations if c["cited_text"] in block["text"]]
        if not cited:
            return
        self.citations = [c for c in self.citations if c not in cited]
        block["citations"] = cited
        index = len(self.blocks) - 1
        events.extend(("content_block_delta", {"type": "content_block_delta", "index": index,
                                               "delta": {"type": "citations_delta",
                                                         "citation": citation}})
                      for citation in cited)

    # -- server tools Gemini ran ------------------------------------------------

    def _metadata_blocks(self, candidate: dict, events: list) -> None:
        """Emit the search and fetch blocks of Gemini's grounding and URL context metadata."""
        grounding = candidate.get("groundingMetadata")
        grounding = grounding if isinstance(grounding, dict) else {}
        if self.request.web_search and grounding and not self.search_requests:
            self._search_blocks(grounding, events)
            self.citations = _citations(grounding)
        url_context = candidate.get("urlContextMetadata")
        if self.request.server_tools.get("web_fetch") and isinstance(url_context, dict) \
                and not self.fetch_requests:
            self._fetch_blocks(url_context, grounding, events)

    def _server_use(self, name: str, tool_input: dict, events: list) -> str:
        """Emit a server_tool_use block; return its id."""
        self._flush_held(events)
        self._close(events)
        tool_id = "srvtoolu_" + secrets.token_hex(12)
        self._whole_block({"type": "server_tool_use", "id": tool_id, "name": name, "input": {}},
                          tool_input, events)
        return tool_id

    def _search_blocks(self, grounding: dict, events: list) -> None:
        """Emit server_tool_use + web_search_tool_result per query Google Search ran; the
        sources (Gemini does not say which query found which) go with the first."""
        queries = [q for q in _items(grounding, "webSearchQueries") if isinstance(q, str)]
        results = []
        for web in _web_sources(grounding):
            if web and web["uri"]:
                results.append({"type": "web_search_result", "url": web["uri"],
                                "title": web.get("title") or web["uri"], "encrypted_content": "",
                                "page_age": None})
        for i, query in enumerate(queries or [""]):
            tool_id = self._server_use("web_search", {"query": query}, events)
            self._whole_block({"type": "web_search_tool_result", "tool_use_id": tool_id,
                               "content": results if i == 0 else []}, None, events)
        self.search_requests = len(queries or [""])

    def _fetch_blocks(self, url_context: dict, grounding: dict, events: list) -> None:
        """Emit server_tool_use + web_fetch_tool_result per URL that URL context read."""
        titles = {web["uri"]: web.get("title") for web in _web_sources(grounding)
                  if web and web["uri"]}
        entries = [entry for entry in _items(url_context, "urlMetadata")
                   if isinstance(entry, dict) and isinstance(entry.get("retrievedUrl"), str)]
        for entry in entries:
            url = entry["retrievedUrl"]
            tool_id = self._server_use("web_fetch", {"url": url}, events)
            self._whole_block({"type": "web_fetch_tool_result", "tool_use_id": tool_id,
                               "content": _fetch_content(entry, titles.get(url))}, None, events)
        self.fetch_requests = len(entries)

    def _code(self, code, events: list) -> None:
        code = code if isinstance(code, dict) else {}
        tool_id = self._server_use("code_execution", {"code": str(code.get("code") or "")}, events)
        self.code_uses[str(code.get("id") or "")] = self.code_uses[""] = tool_id

    def _code_result(self, result, events: list) -> None:
        result = result if isinstance(result, dict) else {}
        tool_id = self.code_uses.get(str(result.get("id") or "")) or self.code_uses.get("")
        if tool_id is None:  # a result without its code: the use still comes first
            tool_id = self._server_use("code_execution", {"code": ""}, events)
        self._flush_held(events)
        self._close(events)
        self._whole_block({"type": "code_execution_tool_result", "tool_use_id": tool_id,
                           "content": _code_result_content(result)}, None, events)

    def _unrelayable(self, part: dict, events: list) -> None:
        """Say in the answer what Gemini produced that no Messages API block can carry."""
        if "functionResponse" in part:
            response = part["functionResponse"] if isinstance(part["functionResponse"], dict) \
                else {}
            what = f"a function response for {response.get('name') or 'a tool'}"
        else:
            data = part.get("inlineData") or part.get("fileData")
            data = data if isinstance(data, dict) else {}
            size = len(data.get("data") or "") * 3 // 4
            details = [str(data.get("mimeType") or "unknown type")[:64]]
            details += [f"{max(1, size // 1024)} KB"] if size else []
            what = f"a file ({', '.join(details)})"
        log.debug("Gemini produced %s, which the Messages API cannot return", what)
        self._flush_held(events)
        gap = "\n\n" if self.open_kind == "text" else ""
        self._emit_text(f"{gap}[proxy: Gemini produced {what}, which cannot be relayed here.]",
                        events)


JSON_PATH_STEP_RE = re.compile(r"\.([^.\[\]]+)|\[(\d+)\]|\['([^']*)'\]|\[\"([^\"]*)\"\]")
PARTIAL_VALUES = ("stringValue", "numberValue", "boolValue", "nullValue")


class _PartialCall:
    """A function call Vertex streams in pieces (streamFunctionCallArguments): each piece has
    partialArgs [{jsonPath, stringValue|numberValue|boolValue|nullValue, willContinue}], and
    willContinue until the last; a string value with willContinue goes on in the next one."""

    def __init__(self):
        self.name, self.id, self.signature = "", "", ""
        self.args: dict = {}
        self.open_string = None  # the path of a string value that continues

    def add(self, call: dict, signature: str | None) -> bool:
        """Take one piece; return True while more pieces of this call follow."""
        self.name = self.name or call.get("name") or ""
        self.id = self.id or call.get("id") or ""
        self.signature = self.signature or signature or ""
        self.args.update(call.get("args") or {})
        for piece in call.get("partialArgs") or ():
            path = _json_path(piece["jsonPath"])
            kind = next((k for k in PARTIAL_VALUES if k in piece), None)
            if path is None or kind is None:
                log.debug("Vertex partial argument not understood: %s", piece["jsonPath"][:80])
                continue
            value = None if kind == "nullValue" else piece[kind]
            if kind == "stringValue" and self.open_string == path:
                value = _json_get(self.args, path) + value
            _json_set(self.args, path, value)
            self.open_string = path if kind == "stringValue" and piece.get("willContinue") \
                else None
        return bool(call.get("willContinue"))

    def call(self) -> dict:
        return {"name": self.name, "id": self.id, "args": self.args}


def _json_path(text: str) -> list | None:
    """Return the steps (keys and indexes) of a JSON path like $.a.b[0]['c d'], or None."""
    if not text.startswith("$"):
        return None
    steps, at = [], 1
    for match in JSON_PATH_STEP_RE.finditer(text, 1):
        if match.start() != at:
            return None
        key, index, quoted, double = match.groups()
        steps.append(int(index) if index is not None else next(
            s for s in (key, quoted, double) if s is not None))
        at = match.end()
    return steps if steps and at == len(text) else None


def _json_get(root: dict, path: list):
    value = root
    for step in path:
        value = value[step]
    return value if isinstance(value, str) else ""


def _json_set(root: dict, path: list, value) -> None:
    """Set root at path, making the objects and arrays on the way; a clash is left alone."""
    container = root
    for step, following in zip(path, path[1:] + [None]):
        if isinstance(step, int) != isinstance(container, list):
            return
        if isinstance(step, int):
            container.extend([None] * (step + 1 - len(container)))
        if following is None:
            container[step] = value
            return
        if not isinstance(container[step] if isinstance(step, int) else
                          container.get(step), (dict, list)):
            container[step] = [] if isinstance(following, int) else {}
        container = container[step]


# Gemini's URL retrieval statuses that failed -> Anthropic web_fetch error codes.
URL_FETCH_ERRORS = {"URL_RETRIEVAL_STATUS_ERROR": "url_not_accessible",
                    "URL_RETRIEVAL_STATUS_PAYWALL": "url_not_accessible",
                    "URL_RETRIEVAL_STATUS_UNSAFE": "url_not_allowed"}


def _items(container: dict, key: str) -> list:
    """Return container[key] when it is a list (Gemini metadata fields), else []."""
    value = container.get(key)
    return value if isinstance(value, list) else []


def _fetch_content(entry: dict, title) -> dict:
    """Return the content of a web_fetch_tool_result for one urlMetadata entry."""
    status = str(entry.get("urlRetrievalStatus"))
    if status != "URL_RETRIEVAL_STATUS_SUCCESS":
        return {"type": "web_fetch_tool_result_error",
                "error_code": URL_FETCH_ERRORS.get(status, "unavailable")}
    # Gemini reports which pages it read and their titles, never the page text.
    return {"type": "web_fetch_result", "url": entry["retrievedUrl"], "retrieved_at": None,
            "content": {"type": "document", "title": title if isinstance(title, str) else None,
                        "citations": None,
                        "source": {"type": "text", "media_type": "text/plain", "data": ""}}}


def _code_result_content(result: dict) -> dict:
    """Return the content of a code_execution_tool_result for a codeExecutionResult."""
    outcome, output = result.get("outcome"), str(result.get("output") or "")
    if outcome == "OUTCOME_DEADLINE_EXCEEDED":
        return {"type": "code_execution_tool_result_error",
                "error_code": "execution_time_exceeded"}
    failed = outcome != "OUTCOME_OK"  # Gemini puts the traceback of a failed run in output
    return {"type": "code_execution_result", "stdout": "" if failed else output,
            "stderr": output if failed else "", "return_code": 1 if failed else 0,
            "content": []}


def _web_sources(grounding: dict) -> list:
    """Return each grounding chunk's web source ({uri, title}) in order, None where a chunk has
    none with a string uri: groundingSupports point at them by index."""
    sources = []
    for chunk in _items(grounding, "groundingChunks"):
        web = chunk.get("web") if isinstance(chunk, dict) else None
        sources.append(web if isinstance(web, dict) and isinstance(web.get("uri"), str) else None)
    return sources


def _citations(grounding: dict) -> list:
    """Return web_search_result_location citations for Google Search's groundingSupports."""
    sources = _web_sources(grounding)
    citations = []
    for support in _items(grounding, "groundingSupports"):
        segment = support.get("segment") if isinstance(support, dict) else None
        cited = segment.get("text") if isinstance(segment, dict) else None
        if not isinstance(cited, str) or not cited.strip():
            continue
        for index in _items(support, "groundingChunkIndices"):
            web = sources[index] if isinstance(index, int) and 0 <= index < len(sources) else None
            if web:
                citations.append({"type": "web_search_result_location", "url": web["uri"],
                                  "title": web.get("title") or None, "cited_text": cited,
                                  "encrypted_index": ""})
    return citations


def _token_count(meta: dict, name: str) -> int:
    count = meta.get(name)
    return count if isinstance(count, int) and count > 0 else 0


# Past this depth of fail states worked out inside one another (five frames each), the text is
# followed a letter at a time: states made that way know their fail, so the nesting ends there.
MAX_FAIL_NESTING = 64
# A lone state shallower than this steps a letter at a time, its moves kept: text that soon
# leaves the sequence (most text) then costs a dict lookup, not a jump, per letter.
JUMP_FROM_DEPTH = 8


class _StopSequences:
    """Find the stop sequence that ends first in streamed text; hold back only a possible start.

    An Aho-Corasick automaton over the sorted sequences, built as the text reaches its states:
    one dict lookup per character whatever the number or length of the sequences. A state is the
    longest tail of the text that begins a sequence; [depth, low, high, fail, stop] is its length,
    the range of sorted sequences it begins, the state of its longest proper tail that begins one
    (-1: worked out when needed), and the sequence that ends with it (the first listed if
    several), or None. moves[state] maps a letter to the next state; a move into a match is never
    kept, so the lookup misses and the match is seen. A tail that only one sequence begins is a
    lone state; from JUMP_FROM_DEPTH letters on, the text is compared with the rest of that
    sequence in one C-level startswith, so echoing a 1,000-character sequence makes a few
    states, not a thousand."""

    def __init__(self, sequences: tuple):
        self.rank = {sequence: i for i, sequence in reversed(list(enumerate(sequences)))}
        self.ordered = sorted(self.rank)
        self.states = [[0, 0, len(self.ordered), 0, None]]
        self.moves: list = [{}]
        self.lone: dict = {}  # (low, depth) -> the lone state of ordered[low][:depth]
        self.first_ends: dict = {}  # low -> (end, sequence): the first match inside ordered[low]
        self.branches: dict = {}  # state -> {letter: (low, high)}, where several sequences go on
        self.follows: dict = {}  # state -> the letters some state on its fail chain goes on with
        self.nesting = 0  # fail states being worked out inside one another
        self.state = 0

    def scan(self, text: str, new_from: int) -> tuple:
        """Return (cut, sequence): text[:cut] is final; sequence is the match cut there, or None.

        text is the held tail (the current state's text) plus new text from new_from on;
        without a match, the caller holds text[cut:]."""
        state, at, size = self.state, new_from, len(text)
        while at < size:
            state, at, stop = self._run(state, text, at, size)
            if stop is not None:
                return at - len(stop), stop
        self.state = state
        return size - self.states[state][0], None

    def _run(self, state: int, text: str, at: int, end: int) -> tuple:
        """Follow text[at:end] from state to its end, a match or a jump along a lone sequence:
        return (state, where the text was followed to, the sequence matched or None)."""
        moves = self.moves
        for at, letter in enumerate(text[at:end], at):
            following = moves[state].get(letter)
            if following is None:
                following, after = self._move(state, letter, text, at, end)
                stop = self.states[following][4]
                if stop is not None or after != at + 1:
                    return following, after, stop
            state = following
        return state, end, None

    def _move(self, state: int, letter: str, text: str, at: int, end: int) -> tuple:
        depth, low, high, _, _ = self.states[state]
        if depth >= JUMP_FROM_DEPTH and high - low == 1 and self.ordered[low][depth] == letter \
                and self.nesting <= MAX_FAIL_NESTING:
            return self._jump(state, text, at, end)
        return self._walk(state, letter), at + 1

    def _jump(self, state: int, text: str, at: int, end: int) -> tuple:
        """Follow the one sequence a lone state begins for as far as text[at:end] agrees with
        it, up to the first match inside it: return (state, position) after that."""
        depth, low = self.states[state][:2]
        sequence, (stop_at, stop) = self.ordered[low], self._first_end(low)
        reach = min(end - at, stop_at - depth)
        if text.startswith(sequence[depth:depth + reach], at):  # the usual case: all of it
            agreed = above = reach
        else:  # text[at:at + agreed] agrees; nothing longer than above does
            agreed, above = 1, reach - 1
        while agreed < above:
            middle = (agreed + above + 1) // 2
            if text.startswith(sequence[depth:depth + middle], at):
                agreed = middle
            else:
                above = middle - 1
        if depth + agreed == stop_at:
            return self._add(stop_at, low, low + 1, -1, stop), at + agreed
        return self._lone(low, depth + agreed), at + agreed

    def _first_end(self, low: int) -> tuple:
        """Return (end, sequence) of the match that ends first inside ordered[low] (the
        sequence itself at the latest): a lone state never follows it past that end."""
        found = self.first_ends.get(low)
        if found is None:
            sequence = self.ordered[low]
            best = (len(sequence), self.rank[sequence], sequence)
            for other in self.ordered:
                at = sequence.find(other, 0, best[0])
                if at >= 0:
                    best = min(best, (at + len(other), self.rank[other], other))
            found = self.first_ends[low] = (best[0], best[2])
        return found

    def _lone(self, low: int, depth: int) -> int:
        state = self.lone.get((low, depth))
        if state is None:
            state = self.lone[(low, depth)] = self._add(depth, low, low + 1, -1, None)
        return state

    def _add(self, depth: int, low: int, high: int, fail: int, stop: str | None) -> int:
        self.states.append([depth, low, high, fail, stop])
        self.moves.append({})
        return len(self.states) - 1

    def _fail(self, state: int) -> int:
        fail = self.states[state][3]
        if fail < 0:  # the longest proper tail's state: follow the sequence from letter 1
            depth, low = self.states[state][:2]
            sequence, fail, at = self.ordered[low], 0, 1
            self.nesting += 1
            try:
                while at < depth:  # no match inside: the stream would have stopped at it
                    fail, at, _ = self._run(fail, sequence, at, depth)
            finally:
                self.nesting -= 1
            self.states[state][3] = fail
        return fail

    def _walk(self, state: int, letter: str) -> int:
        """Return the move from state on letter down its fail chain, adding the states it makes
        and keeping the move in every state passed (each (state, letter) is walked once)."""
        states, moves, unknown, node = self.states, self.moves, [], state
        while True:
            known = moves[node].get(letter)
            if known is not None:
                break
            unknown.append(node)
            if node == 0:
                known = 0
                break
            node = self._fail(node)
            follows = self.follows.get(node)
            if letter not in (follows if follows is not None else self._follows(node)):
                known = 0  # nothing below goes on with it: the walk ends at the root at once
                break
        for node in reversed(unknown):  # known is now the move of the state below node
            span = self._own(node).get(letter)
            if span is not None:
                known = self._child(node, span, known)
            if states[known][4] is None:
                moves[node][letter] = known
        return known

    def _own(self, node: int) -> dict:
        """Return {letter: (low, high)}: the sorted sequences that go on from node with each."""
        depth, low, high, _, _ = self.states[node]
        letter = self.ordered[low][depth]
        if self.ordered[high - 1][depth] == letter:  # sorted: all of them go on with it
            return {letter: (low, high)}
        branches = self.branches.get(node)
        if branches is None:
            branches = self.branches[node] = {}
            for i in range(low, high):
                letter = self.ordered[i][depth]
                branches[letter] = (branches.get(letter, (i,))[0], i + 1)
        return branches

    def _follows(self, node: int) -> frozenset:
        chain = []
        while node not in self.follows:
            chain.append(node)
            if node == 0:
                break
            node = self._fail(node)
        for node in reversed(chain):
            own = self._own(node).keys()
            below = self.follows[self._fail(node)] if node else frozenset()
            self.follows[node] = below if own <= below else below | own
        return self.follows[chain[0] if chain else node]

    def _child(self, node: int, span: tuple, fail: int) -> int:
        low, high = span
        depth, first = self.states[node][0] + 1, self.ordered[low]
        stop = first if len(first) == depth else None  # sorted first, a complete one is it
        inherited = self.states[fail][4]
        if inherited is not None and (stop is None or self.rank[inherited] < self.rank[stop]):
            stop = inherited
        if stop is None and high - low == 1:
            child = self._lone(low, depth)
            if self.states[child][3] < 0:  # made by a jump, its fail not yet worked out
                self.states[child][3] = fail
            return child
        return self._add(depth, low, high, fail, stop)


# == Operators: metrics =======================================================
# Counters and histograms behind GET /metrics.

class _Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count."""

    def __init__(self, buckets: tuple):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.count += 1
        self.sum += value

    def render(self, name: str, help_text: str) -> list:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        lines += [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return lines + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}",
                        f"{name}_count {self.count}"]


LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_KINDS = ("input", "cached", "output", "thinking")
# Why a generate call went upstream: the client's request, a refused call retried (429/5xx,
# 401 with a new token, an invalid key dropped), an empty or malformed answer asked again, or a
# request the self-healing rules changed and sent again.
UPSTREAM_CALL_REASONS = ("first", "retry_status", "retry_empty", "retry_malformed", "self_heal")


def _token_kinds(usage: dict) -> tuple:
    """Return (kind, count) pairs of TOKEN_KINDS for an Anthropic usage object."""
    details = usage.get("output_tokens_details") or {}
    return (("input", usage.get("input_tokens", 0)),
            ("cached", usage.get("cache_read_input_tokens", 0)),
            ("output", usage.get("output_tokens", 0)),
            ("thinking", details.get("thinking_tokens", 0)))


def _label_value(value) -> str:
    """Return a Prometheus label value escaped per the text format (\\, \", \n)."""
    text = str(value)
    if "\\" in text or '"' in text or "\n" in text:
        text = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return text


def _labelled(name: str, help_text: str, counts: dict, label: str) -> list:
    """Return a counter's lines from {model label: {label value: count}}."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
    for model, by_label in sorted(counts.items()):
        lines += [f'{name}{{model="{_label_value(model)}",{label}="{_label_value(value)}"}} '
                  f'{count}' for value, count in by_label.items()]
    return lines


def _merged(counts: dict, label) -> dict:
    """Return {model label: {kind: count}} with the models label() folds together summed."""
    merged: dict = {}
    for model, by_kind in counts.items():
        into = merged.setdefault(label(model), dict.fromkeys(by_kind, 0))
        for kind, count in by_kind.items():
            into[kind] = into.get(kind, 0) + count
    return merged


MAX_MODEL_SERIES = 64  # distinct model label values; Gemini serves a few dozen models


class Metrics:
    """Counters and histograms behind GET /metrics; every update is one short locked step."""

    def __init__(self):
        self.requests: dict = {}  # (route, status, gemini model) -> count
        self.tokens: dict = {}  # gemini model -> {kind: count}, kinds as in TOKEN_KINDS
        self.calls: dict = {}  # gemini model -> {reason: upstream generate calls}
        # Only models Gemini answered get a series of their own (a client cannot add series);
        # the rest are "other". Names not yet answered are kept apart up to a cap.
        self.accepted: set = set()
        self.pending: set = set()
        self.upstream_seconds = _Histogram(LATENCY_BUCKETS)
        self.first_chunk_seconds = _Histogram(LATENCY_BUCKETS)
        self._lock = threading.Lock()

    def accept_model(self, model: str) -> None:
        """Give a model its own series: the upstream answered it (bounded for gateways that
        answer any name)."""
        with self._lock:
            if model not in self.accepted and len(self.accepted) < MAX_MODEL_SERIES:
                self.accepted.add(model)
                self.pending.discard(model)

    def _model_key(self, model: str) -> str:
        if model in self.accepted or model in self.pending or model == "-":
            return model
        if len(self.pending) < MAX_MODEL_SERIES:
            self.pending.add(model)
            return model
        return "other"

    def model_label(self, model: str) -> str:
        return model if model in self.accepted or model == "-" else "other"

    def count_request(self, route: str, status: int, model: str, usage: dict | None) -> None:
        with self._lock:
            model = self._model_key(model)
            key = (route, status, model)
            self.requests[key] = self.requests.get(key, 0) + 1
            if usage:
                tokens = self.tokens.setdefault(model, dict.fromkeys(TOKEN_KINDS, 0))
                for kind, count in _token_kinds(usage):
                    tokens[kind] += count

    def count_call(self, model: str, reason: str) -> None:
        with self._lock:
            model = self._model_key(model)
            calls = self.calls.setdefault(model, dict.fromkeys(UPSTREAM_CALL_REASONS, 0))
            calls[reason] += 1

    def observe(self, histogram: _Histogram, seconds: float) -> None:
        with self._lock:
            histogram.observe(seconds)

    def render(self, gauges: dict) -> str:
        """Return the Prometheus text exposition, with `gauges` (name -> (type, help, value))."""
        prefix = "claude_gemini_proxy_"
        with self._lock:
            lines = [f"# HELP {prefix}requests_total Requests by route, status and Gemini model.",
                     f"# TYPE {prefix}requests_total counter"]
            requests: dict = {}
            for (route, status, model), count in self.requests.items():
                key = (route, status, self.model_label(model))
                requests[key] = requests.get(key, 0) + count
            for (route, status, model), count in sorted(requests.items()):
                lines.append(
                    f'{prefix}requests_total{{route="{_label_value(route)}",status="{status}",'
                    f'model="{_label_value(model)}"}} {count}'
                )
            lines += _labelled(prefix + "tokens_total", "Tokens Gemini reported, by model and "
                               "kind (output includes thinking).",
                               _merged(self.tokens, self.model_label), "kind")
            lines += _labelled(prefix + "upstream_calls_total", "Gemini generate calls by model "
                               "and reason: all but first are extra.",
                               _merged(self.calls, self.model_label), "reason")
            lines += self.upstream_seconds.render(
                prefix + "upstream_seconds", "Time to Gemini's response headers."
            )
            lines += self.first_chunk_seconds.render(
                prefix + "first_chunk_seconds", "Time to Gemini's first chunk."
            )
        for name, (kind, help_text, value) in gauges.items():
            lines += [
                f"# HELP {prefix}{name} {help_text}",
                f"# TYPE {prefix}{name} {kind}",
                f"{prefix}{name} {value}",
            ]
        return "\n".join(lines) + "\n"


# == Upstream client ==========================================================
# One SSL context, a pool of keep-alive http.client connections, key rotation and
# retries; yields parsed stream chunks as they arrive.

class _KeyRing:
    """The Gemini keys in turn; a rate-limited key rests, a rejected one is dropped."""

    def __init__(self, keys: tuple, now=time.monotonic):
        self.keys = list(keys)
        self.resting: dict = {}
        self.turn = 0
        self.now = now
        self._lock = threading.Lock()

    def pick(self) -> str:
        """Return the next key that is not resting (or, if all are, the one resting least)."""
        with self._lock:
            now = self.now()
            for offset in range(len(self.keys)):
                key = self.keys[(self.turn + offset) % len(self.keys)]
                if self.resting.get(key, 0) <= now:
                    self.turn = (self.turn + offset + 1) % len(self.keys)
                    return key
            # All resting: Gemini itself decides, with the key that wakes first.
            return min(self.keys, key=lambda k: self.resting.get(k, 0))

    def rest(self, key: str, seconds: float) -> None:
        with self._lock:
            self.resting[key] = self.now() + seconds

    def drop(self, key: str) -> bool:
        """Take a rejected key out of turn; return False when it is the last one."""
        with self._lock:
            if key not in self.keys or len(self.keys) == 1:
                return False
            position = self.keys.index(key) + 1
            self.keys.remove(key)
            if position <= self.turn:  # the key after the dropped one keeps its turn
                self.turn -= 1
            self.turn %= len(self.keys)
        log.warning("Gemini rejected API key #%d of the list; it is no longer used", position)
        return True

    def resting_count(self) -> int:
        now = self.now()
        return sum(1 for key in self.keys if self.resting.get(key, 0) > now)


class _TokenCommand:
    """A bearer token printed by GEMINI_AUTH_COMMAND, rerun after its TTL and after a 401."""

    def __init__(self, command: str, ttl: float, now=time.monotonic):
        self.command = command
        self.ttl = ttl
        self.now = now
        self.token = ""
        self.expires = 0.0
        self.runs = 0
        self._lock = threading.Lock()

    def get(self) -> str:
        """Return a current token; while one request refreshes it, the others keep the old one."""
        if self.now() >= self.expires and self._lock.acquire(blocking=not self.token):
            try:
                if self.now() >= self.expires:
                    self._run()
            finally:
                self._lock.release()
        return self.token

    def refresh(self, rejected: str) -> None:
        """Run the command again after Gemini rejected `rejected` (once, however many saw it)."""
        with self._lock:
            if self.token == rejected:
                self._run()

    def _run(self) -> None:
        try:
            done = subprocess.run(
                self.command, shell=True, capture_output=True, text=True, timeout=60
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise ProxyError(502, "api_error", f"GEMINI_AUTH_COMMAND could not run: {exc}")
        token = done.stdout.strip()
        if done.returncode or not token:
            said = (done.stderr or "").strip().splitlines()[:1]  # what went wrong, not a token
            raise ProxyError(502, "api_error", f"GEMINI_AUTH_COMMAND failed (exit "
                             f"{done.returncode})" + "".join(f": {s[:200]}" for s in said))
        self.token, self.expires = token, self.now() + self.ttl
        self.runs += 1
        log.info("GEMINI_AUTH_COMMAND gave a new token (run %d)", self.runs)


def _bypasses_proxy(host: str, no_proxy: str) -> bool:
    """Return True when NO_PROXY (curl's rules: *, hosts, .domains, host:port) covers host."""
    host = host.lower().strip("[]")
    for entry in no_proxy.replace(" ", ",").split(","):
        entry = entry.strip().lower().lstrip(".")
        if entry.count(":") == 1:
            entry = entry.split(":")[0]
        if entry == "*" or entry and (host == entry or host.endswith("." + entry)):
            return True
    return False


def _egress_proxy(config: Config, scheme: str, host: str) -> tuple | None:
    """Return (host, port, Proxy-Authorization or None) for the upstream, or None when direct."""
    proxy_url = config.https_proxy if scheme == "https" else config.http_proxy
    if not proxy_url or _bypasses_proxy(host, config.no_proxy):
        return None
    parts = urllib.parse.urlsplit(proxy_url if "://" in proxy_url else "http://" + proxy_url)
    auth = None
    if parts.username:
        credentials = (
            f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        )
        auth = "Basic " + base64.b64encode(credentials.encode()).decode()
    return parts.hostname, parts.port or 80, auth


class UpstreamClient:
    """Talks to Gemini: pooled keep-alive connections, retries, key rotation."""

    max_idle = 64  # idle connections kept per process

    def __init__(self, config: Config, metrics: Metrics, sleep=time.sleep, now=time.monotonic):
        self.config = config
        self.metrics = metrics
        self.sleep = sleep  # retry backoff; tests pass a recorder instead of waiting
        self.now = now
        base = urllib.parse.urlsplit(config.api_base.rstrip("/"))
        self.https = base.scheme == "https"
        self.host = base.hostname
        self.port = base.port or (443 if self.https else 80)
        self.base_path = base.path.rstrip("/")
        prefix, _, version = self.base_path.rpartition("/")  # /v1beta -> /upload/v1beta/files
        self.upload_path = f"{prefix}/upload/{version}/files"
        self._ssl_context = None  # made on first use: loading the CA store costs ~25 ms
        self.egress = _egress_proxy(config, base.scheme, self.host)
        self.keys = _KeyRing(config.api_keys or ("",), now=now)
        self.token_command = (_TokenCommand(config.auth_command, config.auth_ttl, now=now)
                              if config.auth_command else None)
        self.connections_opened = 0
        self.retries = 0
        self._idle: list = []
        self._lock = threading.Lock()

    # -- connections ------------------------------------------------------------

    def _connect(self) -> http.client.HTTPConnection:
        timeout = self.config.connect_timeout
        host, port = (self.egress[0], self.egress[1]) if self.egress else (self.host, self.port)
        if self.https:
            conn = http.client.HTTPSConnection(
                host, port, timeout=timeout, context=self.ssl_context()
            )
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        if self.egress:
            headers = {"Proxy-Authorization": self.egress[2]} if self.egress[2] else None
            conn.set_tunnel(self.host, self.port, headers=headers)
        conn.connect()
        conn.sock.settimeout(self.config.upstream_timeout)
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self.connections_opened += 1
        return conn

    def ssl_context(self) -> ssl.SSLContext:
        """Return the process's one SSL context (SSL_CERT_FILE / SSL_CERT_DIR apply)."""
        with self._lock:
            if self._ssl_context is None:
                self._ssl_context = ssl.create_default_context()
            return self._ssl_context

    def _checkout(self) -> tuple:
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self._connect(), False

    def release(
        self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse
    ) -> None:
        """Return a connection whose response was read to the end to the pool."""
        if response.will_close or not response.isclosed() or conn.sock is None:
            conn.close()
            return
        conn.sock.settimeout(self.config.upstream_timeout)  # reads shortened it to their deadline
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _send(self, method: str, path: str, payload: bytes | None, headers: dict,
              cancel: Cancel | None = None) -> tuple:
        """Return (connection, response); a reused connection that fails is replaced once.
        cancel, when given, can cut the call while Gemini works on it."""
        for attempt in (0, 1):
            conn, reused = None, False
            try:
                conn, reused = self._checkout() if attempt == 0 else (self._connect(), False)
                if cancel is not None:
                    cancel.connecting(conn)
                conn.request(method, path, body=payload, headers=headers)
                sock, response = conn.sock, conn.getresponse()
                if conn.sock is None:  # a close-delimited answer: http.client let go of the
                    conn.sock = sock  # socket; keep it for read deadlines and abort()
                return conn, response
            except (http.client.HTTPException, OSError, _ClientGone) as exc:
                if conn:
                    conn.close()
                if cancel is not None and cancel.cancelled:
                    raise _ClientGone() from None
                stale = reused and attempt == 0 and not isinstance(
                    exc, (socket.timeout, ssl.SSLCertVerificationError))
                if not stale:
                    raise _transport_error(exc, "connecting") from None
                # the pooled connection had gone stale: once more on a fresh one
        raise AssertionError("unreachable")

    # -- requests ---------------------------------------------------------------

    def _auth_headers(self, key: str) -> dict:
        if self.token_command:
            return {"Authorization": f"Bearer {self.token_command.get()}"}
        if self.config.auth_type == "bearer":
            return {"Authorization": f"Bearer {key}"}
        return {"x-goog-api-key": key}

    def _open(self, method: str, path: str, payload: bytes | None = None,
              generation: tuple | None = None, cancel: Cancel | None = None) -> tuple:
        """Return (connection, response) for a 200 answer; raise ProxyError otherwise.

        generation is (model, reason) for a generate call, counted per upstream call."""
        attempt, token_refreshed = 0, False
        while True:
            key = self.keys.pick()
            auth = self._auth_headers(key)
            headers = {"content-type": "application/json", **auth}
            if generation:
                self.metrics.count_call(*generation)
                generation = (generation[0], "retry_status")  # any further call retries this one
            started = self.now()
            conn, response = self._send(method, self.base_path + path, payload, headers, cancel)
            elapsed = self.now() - started
            self.metrics.observe(self.metrics.upstream_seconds, elapsed)
            log.debug("upstream %s %s -> %d after %.0f ms (%d bytes sent)", method,
                      path.split("?")[0], response.status, elapsed * 1000, len(payload or b""))
            if response.status == 200:
                return conn, response
            error = _upstream_error(response.status, self._read_all(conn, response))
            if response.status == 401 and self.token_command and not token_refreshed:
                self.token_command.refresh(auth["Authorization"][7:])
                token_refreshed = True
                continue
            if error.key_invalid and self.keys.drop(key):
                continue
            if response.status == 429:
                self.keys.rest(key, error.retry_delay or DEFAULT_RETRY_AFTER)
            wait = self._retry_wait(response.status, error, attempt)
            if wait is None:
                raise error
            log.debug("upstream %d: retry %d in %.2f s", response.status, attempt + 1, wait)
            with self._lock:
                self.retries += 1
            if wait:  # another key may be free at once
                self.sleep(wait)
            attempt += 1

    def _retry_wait(self, status: int, error: ProxyError, attempt: int) -> float | None:
        if status not in (429, 500, 503) or attempt >= self.config.max_retries:
            return None
        if status == 429 and self.keys.resting_count() < len(self.keys.keys):
            return 0.0  # another key is free now
        if error.retry_delay is not None:
            wait = error.retry_delay
        else:
            wait = _backoff_seconds(attempt)
        return wait if wait <= self.config.max_retry_wait else None

    def _read_all(self, conn, response) -> bytes:
        """Return a whole answer body, read within UPSTREAM_TIMEOUT and MAX_ANSWER_BYTES."""
        if (response.length or 0) > MAX_ANSWER_BYTES:  # declared too long: not read at all
            conn.close()
            raise _answer_too_large()
        pieces, size = [], 0
        deadline = self.now() + self.config.upstream_timeout
        try:
            for piece in _pieces(conn, response, lambda: deadline, self.now):
                size += len(piece)
                if size > MAX_ANSWER_BYTES:
                    conn.close()
                    raise _answer_too_large()
                pieces.append(piece)
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise _transport_error(exc, "reading its answer") from None
        self.release(conn, response)
        return b"".join(pieces)

    def call_json(self, method: str, path: str, body: dict | bytes | None = None) -> dict:
        """Return the parsed JSON object of a 200 answer."""
        payload = body
        if isinstance(body, dict):
            payload = json.dumps(body, separators=(",", ":")).encode()
        conn, response = self._open(method, path, payload)
        answer = _parse_chunk(self._read_all(conn, response), "an answer")
        if not isinstance(answer, dict):
            raise ProxyError(502, "api_error", "Gemini sent an answer the proxy could not read")
        return answer

    def generate(self, model: str, payload: bytes, live: bool, reason: str = "first",
                 cancel: Cancel | None = None) -> UpstreamAnswer:
        """Return Gemini's answer to a generate request: streamed (live) or in one piece.

        reason says why the call is made (UPSTREAM_CALL_REASONS); retries of a refused
        call count as retry_status."""
        if live:
            path = _model_path(model, "streamGenerateContent") + "?alt=sse"
        else:
            path = _model_path(model, "generateContent")
        asked_at = self.now()
        try:
            conn, response = self._open("POST", path, payload, (model, reason), cancel)
        except UpstreamError as error:
            if error.overflow and not error.overflow[0]:  # "too long" without the count
                error.overflow = (self._count_tokens(model, payload), error.overflow[1])
                error.message = _overflow_message(*error.overflow)
            raise
        return UpstreamAnswer(self, conn, response, live, asked_at)

    def _count_tokens(self, model: str, payload: bytes) -> int:
        """Return Gemini's count of a generate payload's prompt, or an estimate from its size."""
        body = json.loads(payload)
        inner = {key: body[key] for key in ("contents", "systemInstruction", "tools", "toolConfig")
                 if key in body}
        try:
            inner["model"] = f"models/{model}"
            answer = self.call_json("POST", _model_path(model, "countTokens"),
                                    {"generateContentRequest": inner})
            if isinstance(answer.get("totalTokens"), int) and answer["totalTokens"] > 0:
                return answer["totalTokens"]
        except ProxyError as error:
            log.debug("countTokens for a too-long prompt failed: %s", error.message)
        return len(payload) // BYTES_PER_TOKEN

    # -- files: resumable uploads and downloads ---------------------------------------

    def _call_raw(self, key: str, path: str, payload: bytes, headers: dict) -> tuple:
        """Return (response, body) of a 200 POST to a path outside the API base; no retries."""
        headers = dict(headers, **self._auth_headers(key))
        conn, response = self._send("POST", path, payload, headers)
        body = self._read_all(conn, response)
        if response.status != 200:
            raise _upstream_error(response.status, body)
        return response, body

    def upload(self, display_name: str, mime_type: str, read) -> dict:
        """Return Gemini's File after a resumable upload of read(n)'s bytes, chunk by chunk."""
        key = self.keys.pick()  # one key for the whole session
        pieces = _upload_pieces(read, UPLOAD_CHUNK_BYTES)
        piece, last = next(pieces)
        headers = {"content-type": "application/json", "X-Goog-Upload-Protocol": "resumable",
                   "X-Goog-Upload-Command": "start",
                   "X-Goog-Upload-Header-Content-Type": mime_type}
        if last:  # the size is known only when the whole file came in the first chunk
            headers["X-Goog-Upload-Header-Content-Length"] = str(len(piece))
        start = json.dumps({"file": {"displayName": display_name}}).encode()
        response, _ = self._call_raw(key, self.upload_path, start, headers)
        url = urllib.parse.urlsplit(response.getheader("x-goog-upload-url") or "")
        if not url.path:
            raise ProxyError(502, "api_error", "Gemini did not start the upload (no upload URL)")
        session = url.path + ("?" + url.query if url.query else "")
        offset = 0
        while True:
            _, answer = self._call_raw(key, session, piece, {
                "content-type": "application/octet-stream", "X-Goog-Upload-Offset": str(offset),
                "X-Goog-Upload-Command": "upload, finalize" if last else "upload"})
            offset += len(piece)
            if last:
                break
            piece = b""  # drop the chunk sent before reading the next: two chunks held at most
            piece, last = next(pieces)
        uploaded = _parse_chunk(answer, "an upload answer")
        if not isinstance(uploaded, dict) or not isinstance(uploaded.get("file"), dict):
            raise ProxyError(502, "api_error", "Gemini's upload answer had no file")
        return uploaded["file"]

    def lines(self, path: str):
        """Yield the lines of a GET answer as they arrive (a JSONL result file)."""
        conn, response = self._open("GET", path)
        timeout = self.config.upstream_timeout
        try:
            yield from _lines(conn, response, lambda: self.now() + timeout, self.now)
        except (OSError, http.client.HTTPException) as exc:
            raise _transport_error(exc, "downloading a file") from None
        finally:
            if response.isclosed():
                self.release(conn, response)
            else:
                conn.close()



class UpstreamAnswer:
    """One Gemini answer: chunks() yields its parsed chunks; close() pools or drops the
    connection; abort() (from any thread) cuts the read when the client has left."""

    def __init__(self, client: UpstreamClient, conn, response, live: bool, asked_at: float):
        self.client = client
        self.conn = conn
        self.response = response
        self.live = live
        self.asked_at = asked_at
        self.aborted = False

    def chunks(self):
        """Yield each Gemini chunk (one for a buffered answer); raise _ClientGone once aborted."""
        try:
            if not self.live:
                yield _parse_chunk(self.client._read_all(self.conn, self.response), "an answer")
                return
            first = True
            for chunk in self._sse_chunks():
                if first:
                    metrics = self.client.metrics
                    metrics.observe(metrics.first_chunk_seconds, self.client.now() - self.asked_at)
                    first = False
                yield chunk
        except ProxyError:
            if self.aborted:
                raise _ClientGone() from None
            raise

    def _sse_chunks(self):
        data_lines, raw_lines, raw_size = [], [], 0
        timeout, now = self.client.config.upstream_timeout, self.client.now
        deadline = now() + timeout  # UPSTREAM_TIMEOUT runs from the last data event
        try:
            for line in _lines(self.conn, self.response, lambda: deadline, now):
                line = line.rstrip(b"\r\n")
                if not line:
                    if data_lines:
                        yield _parse_chunk(b"\n".join(data_lines), "a stream chunk")
                        data_lines, deadline = [], now() + timeout
                elif line.startswith(b"data:"):
                    data_lines.append(line[6:] if line[5:6] == b" " else line[5:])
                elif not line.startswith((b":", b"event:", b"id:", b"retry:")):
                    raw_size += len(line)  # an error may come as raw, multi-line JSON
                    if raw_size > MAX_SSE_LINE:
                        raise ProxyError(502, "api_error", "Gemini sent a stream the proxy "
                                         "could not read (non-data lines past 16 MiB)")
                    raw_lines.append(line)
        except (OSError, http.client.HTTPException) as exc:
            self.conn.close()
            raise _transport_error(exc, "streaming") from None
        if self.aborted:  # the read was cut because the client left: not an empty answer
            raise _ClientGone()
        if data_lines:
            yield _parse_chunk(b"\n".join(data_lines), "a stream chunk")
        if raw_lines:
            yield _parse_chunk(b"\n".join(raw_lines), "a stream chunk")
        self.client.release(self.conn, self.response)

    def close(self) -> None:
        """Pool the connection if its answer was read to the end, else close it."""
        if not self.response.isclosed():
            self.conn.close()

    def abort(self) -> None:
        self.aborted = True
        _cut(self.conn)


def _cut(conn: http.client.HTTPConnection) -> None:
    """Shut an upstream connection's socket from any thread: its reader wakes at once."""
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


MAX_ANSWER_BYTES = 64 << 20  # a non-stream answer (or error body) past this is a 502
MAX_SSE_LINE = 16 << 20  # one SSE line: Gemini's largest chunks (images) stay far below
READ_PIECE = 65536


def _answer_too_large() -> ProxyError:
    return ProxyError(502, "api_error",
                      f"Gemini's answer is larger than {MAX_ANSWER_BYTES >> 20} MiB")


def _pieces(conn, response, deadline, now):
    """Yield the body as it arrives; deadline() is read before each socket read, which gets
    only the time left (a body dripped a byte at a time cannot hold a request past it)."""
    while True:
        left = deadline() - now()
        if left <= 0 or conn.sock is None:
            raise socket.timeout("UPSTREAM_TIMEOUT passed")
        conn.sock.settimeout(left)
        piece = response.read1(READ_PIECE)
        if not piece:
            response.read()  # marks a Content-Length answer read, so its connection is pooled
            return
        yield piece


def _lines(conn, response, deadline, now):
    """Yield the lines of a streamed body, read as _pieces() reads it; a line longer than
    MAX_SSE_LINE is a 502, however the pieces fell."""
    pending, size = [], 0  # pieces of the line not ended yet
    for piece in _pieces(conn, response, deadline, now):
        start = 0
        end = piece.find(b"\n") + 1
        while end:
            _check_line_size(size + end - start)
            pending.append(piece[start:end])
            yield b"".join(pending)
            pending, size, start = [], 0, end
            end = piece.find(b"\n", start) + 1
        if start < len(piece):
            pending.append(piece[start:])
            size += len(piece) - start
            _check_line_size(size)
    if pending:
        yield b"".join(pending)


def _check_line_size(size: int) -> None:
    if size > MAX_SSE_LINE:
        raise ProxyError(502, "api_error", "Gemini sent a stream line longer than "
                         f"{MAX_SSE_LINE >> 20} MiB")


def _parse_chunk(payload: bytes, what: str):
    """Return a Gemini JSON chunk; errors without alt=sse come wrapped in an array."""
    try:
        chunk = _without_lone_surrogates(json.loads(payload), payload, what)
    except (ValueError, RecursionError):
        raise ProxyError(502, "api_error",
                         f"Gemini sent {what} the proxy could not read") from None
    if isinstance(chunk, list) and chunk:
        chunk = chunk[0]
    return chunk


def _model_path(model: str, method: str) -> str:
    """Return the upstream path of a model method, the model name URL-quoted."""
    return f"/models/{urllib.parse.quote(model, safe='')}:{method}"


# == Model list ===============================================================
# GET /v1/models: Gemini's model list in Anthropic shape, cached, paged.

MODEL_CACHE_SECONDS = 300.0
UNKNOWN_DATE = "1970-01-01T00:00:00Z"  # Gemini's model list has no release dates
# Gemini's Model objects carry no stage, so the lifecycle comes from Google's deprecations page
# and changelog: model id -> (lifecycle, deprecated_at).
MODEL_LIFECYCLE = {
    "gemini-3.5-flash": ("deprecated", "2026-10-08T00:00:00Z"),  # served by 3.6 Flash
    "gemini-3.7-flash": ("deprecated", "2026-10-08T00:00:00Z"),  # served by 3.8 Flash
    "gemini-2.5-pro": ("retired", "2026-12-01T00:00:00Z"),
    "gemini-2.5-flash": ("retired", "2026-12-01T00:00:00Z"),
    "gemini-3-pro-preview": ("retired", "2026-03-09T00:00:00Z"),
    "gemini-2.0-flash": ("retired", "2026-06-01T00:00:00Z"),
}
LIFECYCLES = ("active", "deprecated", "retired")


class _ModelCatalog:
    """Gemini's model list in Anthropic shape, fetched page by page and cached for a while."""

    def __init__(self, upstream: UpstreamClient, config: Config, now=time.monotonic):
        self.upstream = upstream
        self.config = config
        self.now = now
        self._cached = (0.0, [], {})  # (expires, Anthropic entries, Gemini's models by id)
        self._lock = threading.Lock()

    def models(self) -> list:
        return self._current()[1]

    def gemini_models(self) -> dict:
        """Return Gemini's own model objects by id (fetched if the cache is stale)."""
        return self._current()[2]

    def known(self, model: str) -> dict | None:
        """Return Gemini's model object for `model` from the cache, never calling Gemini."""
        return self._cached[2].get(model)

    def closest(self, model: str, count: int = 3) -> list:
        """Return the ids of the available Gemini models most like `model`."""
        try:
            ids = list(self.gemini_models())
        except ProxyError:
            return []
        return difflib.get_close_matches(model, ids, n=count, cutoff=0.5)

    def _current(self) -> tuple:
        with self._lock:
            if self._cached[0] <= self.now():
                models, gemini = self._fetch()
                self._cached = (self.now() + MODEL_CACHE_SECONDS, models, gemini)
            return self._cached

    def _fetch(self) -> tuple:
        gemini, token = [], ""
        for _page in range(100):
            path = "/models?pageSize=1000" + (
                f"&pageToken={urllib.parse.quote(token)}" if token else ""
            )
            try:
                page = self.upstream.call_json("GET", path)
            except ProxyError as error:
                if not isinstance(error, UpstreamError) or error.upstream_status != 404:
                    raise
                break  # Vertex AI has no model list at this base: offer the table's names
            gemini.extend(m for m in page.get("models") or () if isinstance(m, dict)
                          and "generateContent" in (m.get("supportedGenerationMethods") or ()))
            token = page.get("nextPageToken")
            if not token:
                break
        models, by_id, gemini_by_id = [], {}, {}
        for model in gemini:
            entry = _model_info(model)
            by_id[entry["id"]] = entry
            gemini_by_id[entry["id"]] = model
            models.append(entry)
        for name in MODEL_TABLE:
            if name not in by_id:
                target = by_id.get(map_model(name, self.config)) or _model_info({})
                models.append(dict(target, id=name, display_name=name))
        return models, gemini_by_id


def _model_info(gemini_model: dict) -> dict:
    """Return the Anthropic ModelInfo for one entry of Gemini's model list."""
    model_id = str(gemini_model.get("name", "")).replace("models/", "", 1)
    lifecycle, since = MODEL_LIFECYCLE.get(model_id, ("active", None))
    entry = {
        "type": "model",
        "id": model_id,
        "display_name": gemini_model.get("displayName") or model_id,
        "created_at": UNKNOWN_DATE,
        "lifecycle": lifecycle,
        "deprecated_at": since,
        "max_input_tokens": gemini_model.get("inputTokenLimit"),
        "max_tokens": gemini_model.get("outputTokenLimit"),
    }
    if model_id:
        entry["capabilities"] = _capabilities(gemini_model, model_id)
    return entry


def _support(flag) -> dict:
    return {"supported": bool(flag)}


def _capabilities(gemini_model: dict, model_id: str) -> dict:
    """Return ModelInfo.capabilities: what Gemini's list says, as this proxy can relay it."""
    thinks = gemini_model.get("thinking") is True
    multimodal = model_id.startswith("gemini-")  # every Gemini model reads images and PDFs
    batch = "batchGenerateContent" in (gemini_model.get("supportedGenerationMethods") or ())
    levels = {level: _support(thinks) for level in ("low", "medium", "high", "xhigh", "max")}
    return {
        "batch": _support(batch and "/v1/messages/batches" in ROUTES),
        "citations": _support(False),  # document citations have no Gemini counterpart
        "code_execution": _support(False),  # no programmatic tool calling from Gemini's sandbox
        "context_management": {"supported": False},
        "effort": dict(levels, supported=thinks),
        "image_input": _support(multimodal),
        "pdf_input": _support(multimodal),
        "server_tools": {"supported": multimodal, "web_search": _support(multimodal),
                         "code_execution": _support(multimodal)},
        "structured_outputs": _support(multimodal),
        # disabled and between_tools are accepted (never a 400), as the SDK type defines them
        "thinking": {"supported": thinks, "types": {
            "adaptive": _support(thinks), "enabled": _support(thinks),
            "disabled": _support(True), "between_tools": _support(True)}},
    }


def _page_models(models: list, query: dict) -> dict:
    """Return one page of the Anthropic model list for lifecycle / limit / after_id / before_id."""
    wanted = _lifecycle_filter(query)
    return _page_by_id([m for m in models if m["lifecycle"] in wanted], query)


def _page_limit(query: dict) -> int:
    """Return an Anthropic list's limit (default 20); 400 outside 1-1000."""
    try:
        limit = int(query.get("limit", ["20"])[0])
    except ValueError:
        limit = 0
    if not 1 <= limit <= 1000:
        raise _bad_request("limit: must be an integer from 1 to 1000")
    return limit


def _page_by_id(items: list, query: dict) -> dict:
    """Return one page of a list of objects with ids for limit / after_id / before_id."""
    limit = _page_limit(query)
    ids = [item["id"] for item in items]
    after, before = query.get("after_id", [""])[0], query.get("before_id", [""])[0]
    if before:
        end = ids.index(before) if before in ids else 0
        start = max(0, end - limit)
        page, has_more = items[start:end], start > 0
    else:
        start = ids.index(after) + 1 if after in ids else 0
        page, has_more = items[start:start + limit], start + limit < len(items)
    return {"data": page, "has_more": has_more, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None}


def _lifecycle_filter(query: dict) -> set:
    """Return the lifecycles a list asks for; retired models only when asked by name."""
    # The SDK sends lifecycle[]=a&lifecycle[]=b; curl users write lifecycle=a,b.
    values = [v for raw in query.get("lifecycle[]", []) + query.get("lifecycle", [])
              for v in raw.split(",") if v]
    for value in values:
        if value not in LIFECYCLES:
            raise _bad_request(f"lifecycle: {value!r} is not one of {', '.join(LIFECYCLES)}")
    return set(values) or {"active", "deprecated"}


# == Self-healing =============================================================
# _SelfHealing: what the proxy learns from Gemini's refusals (fields a model refuses, tool schemas
# it refuses, the model serving a name) and MODEL_FALLBACKS; errors that name what to fix.

# Gemini points at a declaration as tools[0].function_declarations[3] (or functionDeclarations).
TOOL_PATH_RE = re.compile(r"tools\[(\d+)\]\.function_?declarations\[(\d+)\]", re.IGNORECASE)


def _rejected_declarations(error: UpstreamError, body: dict) -> list:
    """Return the function declarations a Gemini 400 points into, in order, without repeats."""
    if error.upstream_status != 400:
        return []
    found, tools = [], body.get("tools") or []
    for tool, index in TOOL_PATH_RE.findall(error.message):
        tool, index = int(tool), int(index)
        declarations = (tools[tool].get("functionDeclarations") or []) if tool < len(tools) else []
        if index < len(declarations) and declarations[index] not in found:
            found.append(declarations[index])
    return found


def _name_rejected_tools(error: UpstreamError, request: GeminiRequest) -> UpstreamError:
    """Return the error with the client's names of the tools a Gemini 400 points into."""
    declarations = _rejected_declarations(error, request.body)
    if not declarations:
        return error
    names = ", ".join(
        f"`{request.tool_names.get(d['name'], d['name'])}`" for d in declarations)
    said = error.message[8:] if error.message.startswith("Gemini: ") else error.message
    verb = "has an input schema" if len(declarations) == 1 else "have input schemas"
    return UpstreamError(error.status, error.error_type,
                         f"tool {names} {verb} Gemini rejects: {said}", error.headers,
                         upstream_status=error.upstream_status, retry_delay=error.retry_delay,
                         key_invalid=error.key_invalid)


def _not_found_message(model: str, closest: list) -> str:
    """Return the 404 message for a model Gemini does not serve, with the closest it does."""
    message = f"model: Gemini does not serve {model} (retired, renamed or misspelt)"
    if closest:
        message += f"; closest available: {', '.join(closest)}"
    return message + "; route the name elsewhere with MODEL_MAP or MODEL_FALLBACKS"


MAX_HEALING_RETRIES = 2  # per request; each must change the body, so none can repeat
FALLBACK_STATUSES = (404, 429, 503)  # a 429 or 503 arrives here after UpstreamClient's retries
THINKING_LEVELS = ("MINIMAL", "LOW", "MEDIUM", "HIGH")
LEVEL_BUDGETS = {"MINIMAL": 512, "LOW": 1024, "MEDIUM": 8192, "HIGH": 24576}
SAFETY_CATEGORY_RE = re.compile(r"HARM_CATEGORY_[A-Z_]+")
BUDGET_RANGE_RE = re.compile(r"between (\d+) and (\d+)|range \[?(\d+)\s*[,-]\s*(\d+)", re.I)
UNKNOWN_FIELD_RE = re.compile(r"unknown name|cannot find field", re.I)
# How a Gemini 400 names an optional field the proxy added or passed on, and the field. Fields
# the answer's meaning depends on (contents, tools, stop sequences, max tokens) are not here.
HEALABLE_FIELDS = tuple((re.compile(pattern, re.I), field) for pattern, field in (
    (r"\btemperature\b", "temperature"),
    (r"\btop_?p\b", "topP"),
    (r"\btop_?k\b", "topK"),
    (r"\binclude_?thoughts\b", "includeThoughts"),
    (r"\bthinking[_ ]?level\b", "thinkingLevel"),
    (r"\bthinking[_ ]?budget\b", "thinkingBudget"),
    (r"\bresponse_?json_?schema\b", "responseJsonSchema"),
    (r"function_?response\.parts|\"parts\" at '[^']*function_?response", "functionResponse.parts"),
    (r"\bsafety_?settings\b|\bHARM_CATEGORY_", "safetySettings"),
    (r"ending with a model turn", "prefill"),
    (r"tool use with function calling is unsupported", "builtinTools"),  # no combination
))
# What the WARNING says for each kind of fix: (what Gemini refused, what the proxy does).
FIX_WORDS = {
    "drop": ("{}", "leaves it out"),
    "level": ("thinkingLevel {0[0]}", "sends {0[1]}"),
    "level_as_budget": ("thinkingLevel", "sends thinkingBudget"),
    "budget_as_level": ("thinkingBudget", "sends thinkingLevel"),
    "budget_range": ("a thinkingBudget outside {0[0]}..{0[1]}", "clamps it"),
    "schema_in_prompt": ("responseJsonSchema", "puts the schema in the system instruction"),
    "safety": ("safety category {}", "leaves it out"),
    "media_beside": ("media inside functionResponse.parts", "puts it after the responses"),
    "prefill_as_user": ("a closing model turn (prefill)", "sends it in the user turn"),
    "functions_only": ("built-in tools next to function declarations",
                       "sends the function declarations alone"),
}


def _generation(body: dict) -> dict:
    return body.get("generationConfig") or {}


def _thinking(body: dict) -> dict:
    return _generation(body).get("thinkingConfig") or {}


def _fix_drop(body: dict, field: str) -> bool:  # {temperature|topP|topK} or includeThoughts
    holder = _thinking(body) if field == "includeThoughts" else _generation(body)
    return holder.pop(field, None) is not None


def _fix_level(body: dict, levels: tuple) -> bool:  # (refused level, accepted level)
    thinking = _thinking(body)
    if thinking.get("thinkingLevel") != levels[0]:
        return False
    thinking["thinkingLevel"] = levels[1]
    return True


def _fix_level_as_budget(body: dict, _arg) -> bool:
    level = _thinking(body).pop("thinkingLevel", None)
    if level is not None:
        _thinking(body)["thinkingBudget"] = LEVEL_BUDGETS.get(level, 8192)
    return level is not None


def _fix_budget_as_level(body: dict, _arg) -> bool:
    budget = _thinking(body).pop("thinkingBudget", None)
    if isinstance(budget, int):
        _thinking(body)["thinkingLevel"] = (
            "LOW" if budget <= 4096 else "MEDIUM" if budget <= 16384 else "HIGH")
    return budget is not None


def _fix_budget_range(body: dict, bounds: tuple) -> bool:
    thinking = _thinking(body)
    budget = thinking.get("thinkingBudget")
    if not isinstance(budget, int) or bounds[0] <= budget <= bounds[1]:
        return False
    thinking["thinkingBudget"] = min(max(budget, bounds[0]), bounds[1])
    return True


def _fix_schema_in_prompt(body: dict, _arg) -> bool:
    schema = _generation(body).pop("responseJsonSchema", None)
    if schema is None:
        return False
    system = body.get("systemInstruction") or {"parts": []}
    text = "Answer with JSON matching this JSON Schema: " + json.dumps(schema, ensure_ascii=False)
    rest = {k: v for k, v in body.items() if k != "systemInstruction"}
    body.clear()  # the system instruction stays first, where the cacheable prefix starts
    body["systemInstruction"] = {"parts": list(system["parts"]) + [{"text": text}]}
    body.update(rest)
    return True


def _fix_safety(body: dict, category: str) -> bool:
    settings = body.get("safetySettings") or []
    kept = [s for s in settings if s.get("category") != category]
    body["safetySettings"] = kept  # a new list: SAFETY_OFF itself is shared
    return len(kept) < len(settings)


def _fix_media_beside(body: dict, _arg) -> bool:
    changed = False
    for content in body.get("contents") or ():
        parts, moved = content["parts"], []
        for part in parts:
            response = part.get("functionResponse")
            if isinstance(response, dict) and response.get("parts"):
                moved.extend(response.pop("parts"))
        if moved:  # as older models get them: after the turn's responses
            at = sum(1 for part in parts if "functionResponse" in part)
            content["parts"] = parts[:at] + moved + parts[at:]
            changed = True
    return changed


def _fix_functions_only(body: dict, _arg) -> bool:
    """Leave out the built-in tools of a request that also declares functions (as on 2.x)."""
    tools = body.get("tools") or []
    functions = [tool for tool in tools if "functionDeclarations" in tool]
    if not functions or len(functions) == len(tools):
        return False
    body["tools"] = functions
    (body.get("toolConfig") or {}).pop("includeServerSideToolInvocations", None)
    return True


def _fix_prefill_as_user(body: dict, _arg) -> bool:
    return _prefill_as_user(body.get("contents") or [])


FIXES = {"prefill_as_user": _fix_prefill_as_user, "drop": _fix_drop, "level": _fix_level,
         "level_as_budget": _fix_level_as_budget,
         "budget_as_level": _fix_budget_as_level, "budget_range": _fix_budget_range,
         "schema_in_prompt": _fix_schema_in_prompt, "safety": _fix_safety,
         "media_beside": _fix_media_beside, "functions_only": _fix_functions_only}


def _apply_fix(body: dict, fix: tuple) -> bool:
    """Apply a learnt fix (kind, argument) to a Gemini body; return True if it changed it."""
    return FIXES[fix[0]](body, fix[1])


def _fix_for(message: str, field: str, body: dict) -> tuple | None:
    """Return the fix for a Gemini 400 `message` that names `field`, or None."""
    if field in ("temperature", "topP", "topK", "includeThoughts"):
        return ("drop", field)
    if field == "thinkingLevel":
        level = _thinking(body).get("thinkingLevel")
        named = any(re.search(rf"\b{name}\b", message) for name in THINKING_LEVELS + ("XHIGH",))
        if level is None or UNKNOWN_FIELD_RE.search(message) or not named:
            return ("level_as_budget", None)  # the field itself, not its value, is refused
        return ("level", (level, _nearest_level(level, message)))
    if field == "thinkingBudget":
        bounds = BUDGET_RANGE_RE.search(message)
        if bounds:
            numbers = [int(n) for n in bounds.groups() if n]
            return ("budget_range", (min(numbers), max(numbers)))
        return ("budget_as_level", None)
    if field == "responseJsonSchema":
        return ("schema_in_prompt", None)
    if field == "functionResponse.parts":
        return ("media_beside", None)
    if field == "prefill":
        return ("prefill_as_user", None)
    if field == "builtinTools":
        return ("functions_only", None)
    named = SAFETY_CATEGORY_RE.findall(message)
    return ("safety", named[0]) if named else None


def _nearest_level(level: str, message: str) -> str:
    """Return the level Gemini's message offers nearest to `level`, else one step to MEDIUM."""
    order = THINKING_LEVELS.index(level) if level in THINKING_LEVELS else len(THINKING_LEVELS)
    offered = [(abs(i - order), i, name) for i, name in enumerate(THINKING_LEVELS)
               if name != level and re.search(rf"\b{name}\b", message)]
    if offered:
        return min(offered)[2]
    return THINKING_LEVELS[order + 1 if order < 2 else min(order, len(THINKING_LEVELS)) - 1]


def _schema_hash(schema) -> str:
    return hashlib.sha256(json.dumps(schema, sort_keys=True).encode()).hexdigest()


class _SelfHealing:
    """What this process learnt about Gemini: fields each model refuses, tool schemas Gemini
    refuses, which model serves a name; applied to every request, retried once per lesson."""

    def __init__(self, config: Config, signatures: SignatureStore, catalog: _ModelCatalog):
        self.config = config
        self.signatures = signatures
        self.catalog = catalog
        self.fallbacks = dict(config.model_fallbacks)
        self.fixes: dict = {}  # Gemini model -> [fix, ...]
        self.repaired: set = set()  # hashes of tool schemas sent reduced
        self.served: dict = {}  # model asked for -> the modelVersion that answers it
        self._lock = threading.Lock()

    def translate(self, body, model: str = "") -> GeminiRequest:
        """Return the Gemini request for a client body (for `model`, else as routed), with the
        serving model's rules and everything learnt so far."""
        routed = model
        if not routed and isinstance(body, dict) and isinstance(body.get("model"), str):
            routed = map_model(body["model"], self.config)
        served = self.served.get(routed, "")
        info = self.catalog.known(served) or self.catalog.known(routed)
        request = to_gemini_request(body, self.config, self.signatures, model=model,
                                    rules_model=served, model_info=info)
        for fix in self.fixes.get(request.model, ()):
            _apply_fix(request.body, fix)
        if self.repaired and self.config.tool_schema_repair:
            repaired = self.repaired
            self._repair(request, lambda d: _schema_hash(d["parametersJsonSchema"]) in repaired)
        return request

    def open(self, upstream: UpstreamClient, request: GeminiRequest, body: dict, live: bool,
             reason: str = "first", cancel: Cancel | None = None) -> tuple:
        """Return (Gemini's 200 answer, the request it answered). A refusal the proxy can fix
        is retried fixed; a retired or overloaded model goes once to its MODEL_FALLBACKS model;
        an error that remains names what the client can act on. A change is remembered once
        Gemini accepted the request it made."""
        lessons, fell_back = [], False
        while True:
            try:
                answer = upstream.generate(request.model, request.payload(), live, reason,
                                           cancel)
            except UpstreamError as error:
                log.debug("Gemini answered HTTP %d for %s: %s", error.upstream_status,
                          request.model, error.message)
                reason = "self_heal"
                if len(lessons) < MAX_HEALING_RETRIES and self.heal(request, error, lessons):
                    continue
                fallback = self.fallbacks.get(request.model)
                if fallback and not fell_back and error.upstream_status in FALLBACK_STATUSES:
                    say = log.warning if error.upstream_status == 404 else log.info
                    say("%s answered HTTP %d; sending the request once to its fallback %s",
                        request.model, error.upstream_status, fallback)
                    fell_back = True
                    request = self.translate(body, fallback)
                    continue
                raise self.explain(request, error) from None
            for lesson in lessons:
                self._learn(request.model, *lesson)
            return answer, request

    def heal(self, request: GeminiRequest, error: UpstreamError, lessons: list) -> bool:
        """Change the request so Gemini may accept it, adding what was changed to `lessons`;
        return False when no change fits."""
        if error.upstream_status != 400 or error.key_invalid:
            return False
        if TOOL_PATH_RE.search(error.message):  # about a tool schema, nothing else
            return self.config.tool_schema_repair and self._repair_rejected(
                request, error, lessons)
        for pattern, field in HEALABLE_FIELDS:
            if pattern.search(error.message):
                fix = _fix_for(error.message, field, request.body)
                if fix and _apply_fix(request.body, fix):
                    lessons.append((request.model, fix, error))
                    request.edited()
                    return True
        return False

    def _repair_rejected(self, request: GeminiRequest, error: UpstreamError,
                         lessons: list) -> bool:
        rejected = [d for d in _rejected_declarations(error, request.body)
                    if "parametersJsonSchema" in d]
        hashes = frozenset(_schema_hash(d["parametersJsonSchema"]) for d in rejected)
        names = self._repair(request, lambda d: any(d is r for r in rejected))
        if names:
            lessons.append(("", ("schemas", (hashes, ", ".join(names))), error))
        return bool(names)

    def _repair(self, request: GeminiRequest, wanted) -> list:
        """Reduce the schemas of the declarations `wanted` picks; return their client names."""
        names = []
        for tool in request.body.get("tools") or ():
            declarations = tool.get("functionDeclarations") or []
            for i, declaration in enumerate(declarations):
                if "parametersJsonSchema" in declaration and wanted(declaration):
                    declarations[i] = _repaired_declaration(declaration)
                    names.append(request.tool_names.get(declaration["name"], declaration["name"]))
        if names:
            request.edited()
        return names

    def _learn(self, answered: str, model: str, fix: tuple, error: UpstreamError) -> None:
        """Remember a change that made Gemini accept a request, with one WARNING."""
        if fix[0] == "schemas":  # ((schema hashes), client tool names): for every model
            with self._lock:
                if fix[1][0] <= self.repaired:
                    return
                self.repaired.update(fix[1][0])
            log.warning("tool %s: Gemini rejects its input schema (%s); sent reduced to "
                        "Gemini's parameters Schema, now and whenever it comes again",
                        fix[1][1], error.message)
            return
        if model != answered:  # unproven: the fallback model answered
            return
        with self._lock:
            known = self.fixes.setdefault(model, [])
            if fix in known:
                return
            known.append(fix)
        what, instead = FIX_WORDS[fix[0]]
        log.warning("%s refuses %s; the proxy %s for %s from now on (%s)", model,
                    what.format(fix[1]), instead, model, error.message)

    def explain(self, request: GeminiRequest, error: UpstreamError) -> UpstreamError:
        """Return the error the client gets: a 404 lists the closest models, a schema 400 names
        the client's tool."""
        if error.upstream_status == 404 and "model" in error.message.lower():
            closest = [m for m in self.catalog.closest(request.model) if m != request.model]
            return UpstreamError(error.status, error.error_type,
                                 _not_found_message(request.model, closest), error.headers,
                                 upstream_status=404)
        return _name_rejected_tools(error, request)

    def note_served(self, model: str, version: str) -> None:
        """Remember that Gemini answers `model` with `version`: its rules apply from now on."""
        if not version or version.startswith(model) or self.served.get(model) == version:
            return
        with self._lock:
            self.served[model] = version
        log.info("Gemini serves %s with %s; the proxy follows %s's rules for it",
                 model, version, version)


# == Batches and files ========================================================
# Message Batches on Gemini's Batch API, Files on its Files API; nothing kept here: ids
# are HMAC-tagged Gemini names and custom_ids travel in each Gemini request's metadata key.

BATCH_PREFIX, FILE_PREFIX = "msgbatch_", "file_"
MAX_BATCH_REQUESTS = 100_000  # Anthropic's limits for one batch
MAX_BATCH_BYTES = 256 * 1024 * 1024
MAX_FILE_BYTES = 2 * 1024 ** 3  # Gemini's limit per file
MULTIPART_OVERHEAD = 1024 * 1024  # boundaries and part headers around the file itself
MULTIPART_HEADER_LIMIT = 16 * 1024
UPLOAD_CHUNK_BYTES = 8 * 1024 * 1024  # Gemini wants chunks in multiples of 256 KiB
GEMINI_FILE_SECONDS = 48 * 3600  # Gemini keeps files, and expires unfinished batches, at 48 h
BATCH_LIST_PAGES = 20  # of 100 Gemini batches each, for GET /v1/messages/batches
CUSTOM_ID_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
BATCH_NAME_RE = re.compile(r"^batches/[A-Za-z0-9_-]+$")
FILE_NAME_RE = re.compile(r"^files/[A-Za-z0-9_-]+$")
DISPLAY_PREFIX = "claude_gemini_proxy:"  # display names of the batches and files we create
BATCH_STATES = {  # Gemini batch state -> Anthropic processing_status
    "BATCH_STATE_UNSPECIFIED": "in_progress",
    "BATCH_STATE_PENDING": "in_progress",
    "BATCH_STATE_RUNNING": "in_progress",
    "BATCH_STATE_CANCELLING": "canceling",
    "BATCH_STATE_SUCCEEDED": "ended",
    "BATCH_STATE_FAILED": "ended",
    "BATCH_STATE_CANCELLED": "ended",
    "BATCH_STATE_EXPIRED": "ended",
}
# The result of a request Gemini never answered, by how its batch ended (else errored).
UNANSWERED_RESULTS = {"BATCH_STATE_CANCELLED": "canceled", "BATCH_STATE_EXPIRED": "expired"}


def _epoch_of(timestamp) -> int:
    """Return the Unix time of an RFC 3339 UTC timestamp (Gemini's are Z-normalized), or 0."""
    try:
        return calendar.timegm(time.strptime(str(timestamp)[:19], "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return 0


def _rfc3339_of(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _read_exactly(read, size: int) -> bytearray:
    """Return size bytes from read(n), fewer only at the end (a bytearray: no second copy)."""
    data = bytearray()
    while len(data) < size:
        piece = read(size - len(data))
        if not piece:
            break
        data += piece
    return data


def _upload_pieces(read, chunk_size: int):
    """Yield (chunk, is_last) of chunk_size bytes from read(n), reading one chunk ahead."""
    chunk = _read_exactly(read, chunk_size)
    while True:
        following = _read_exactly(read, chunk_size) if len(chunk) == chunk_size else b""
        yield chunk, not following
        if not following:
            return
        chunk = following


def _iter_reader(pieces):
    """Return read(n) over an iterable of byte strings."""
    source, buffer = iter(pieces), bytearray()

    def read(size: int) -> bytes:
        while len(buffer) < size:
            piece = next(source, None)
            if piece is None:
                break
            buffer.extend(piece)
        data = bytes(buffer[:size])
        del buffer[:size]
        return data

    return read


def _multipart_boundary(content_type: str) -> bytes:
    """Return the boundary of a multipart/form-data Content-Type; 400 for anything else."""
    message = email.parser.HeaderParser().parsestr(f"Content-Type: {content_type}\n\n")
    boundary = message.get_param("boundary")
    if message.get_content_type() != "multipart/form-data" or not boundary:
        raise _bad_request("content-type: send the file as multipart/form-data with a boundary")
    return str(boundary).encode("latin-1")


class _MultipartReader:
    """Reads multipart/form-data parts from read(n) as streams, holding about 1 MiB."""

    def __init__(self, read, boundary: bytes):
        self.read_body = read
        self.delimiter = b"\r\n--" + boundary
        self.buffer = bytearray(b"\r\n")  # so the first boundary looks like the others
        self.eof = False

    def _fill(self, wanted: int) -> None:
        while len(self.buffer) < wanted and not self.eof:
            piece = self.read_body(65536)
            self.eof = not piece
            self.buffer += piece

    def read(self, size: int) -> bytes:
        """Return up to size bytes of the current part (or preamble); b"" at its end."""
        size = min(size, 1024 * 1024)
        self._fill(size + len(self.delimiter))
        at = self.buffer.find(self.delimiter)
        if at < 0:
            if self.eof:
                raise _bad_request("file: the multipart body ended before its closing boundary")
            at = len(self.buffer) - len(self.delimiter) + 1
        data = bytes(self.buffer[:min(size, at)])
        del self.buffer[:len(data)]
        return data

    def next_part(self):
        """Return the next part's headers (email.message.Message), or None after the last."""
        while self.read(1024 * 1024):
            pass
        del self.buffer[:len(self.delimiter)]
        self._fill(MULTIPART_HEADER_LIMIT)
        if self.buffer[:2] == b"--":
            while self.read_body(65536):  # the epilogue
                pass
            return None
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            raise _bad_request("file: a multipart part's headers do not end (or pass 16 KiB)")
        headers = bytes(self.buffer[:end]).lstrip(b" \t").lstrip(b"\r\n")
        del self.buffer[:end + 4]
        return email.parser.BytesHeaderParser().parsebytes(headers)


def _limited(read, limit: int):
    """Return read(n) that answers 413 once more than limit bytes went through it."""
    seen = [0]

    def read_limited(size: int) -> bytes:
        data = read(size)
        seen[0] += len(data)
        if seen[0] > limit:
            raise ProxyError(413, "request_too_large", f"file: larger than Gemini's {limit} "
                             "bytes per file", {"x-should-retry": "false"})
        return data

    return read_limited


def _file_object(key: bytes, gemini_file: dict) -> dict:
    """Return the Anthropic FileMetadata for a Gemini File; its id carries name, type, expiry."""
    name = str(gemini_file.get("name") or "")
    mime_type = str(gemini_file.get("mimeType") or "application/octet-stream")
    created = _epoch_of(gemini_file.get("createTime"))
    expires = _epoch_of(gemini_file.get("expirationTime")) or created + GEMINI_FILE_SECONDS
    fields = [name, mime_type, str(expires), str(gemini_file.get("uri") or "")]
    return {"id": FILE_PREFIX + _encode_names(key, KIND_FILE, fields), "type": "file",
            "filename": str(gemini_file.get("displayName") or name.rpartition("/")[2]),
            "mime_type": mime_type, "size_bytes": int(gemini_file.get("sizeBytes") or 0),
            "created_at": _rfc3339_of(created), "expires_at": _rfc3339_of(expires),
            "downloadable": False}


def _display_name(key: bytes, label: str) -> str:
    """Return a Gemini display name that shows this key made the batch: label + its HMAC."""
    mac = hmac.new(key, label.encode(), hashlib.sha256).hexdigest()[:16]
    return f"{DISPLAY_PREFIX}{label}.{mac}"


def _display_label(key: bytes, display_name: str) -> tuple | None:
    """Return (group, index, count) from a display name this key gave, else None."""
    label = display_name[len(DISPLAY_PREFIX):].rpartition(".")[0]
    group, _, place = label.partition(".")
    index, _, count = place.partition(".")
    if not (index.isdigit() and count.isdigit()) or not hmac.compare_digest(
        display_name.encode(), _display_name(key, label).encode()
    ):
        return None
    return group, int(index), int(count)


def _request_key(custom_id: str, request: GeminiRequest) -> str:
    """Return the metadata key of a Gemini batch request: custom_id and what the fold needs."""
    renamed = {gemini: client for gemini, client in request.tool_names.items() if gemini != client}
    builtins = {kind: tool.get("name") for kind, tool in request.server_tools.items()}
    return json.dumps([custom_id, request.client_model, renamed, list(request.stop_sequences),
                       request.thinking, builtins], separators=(",", ":"), ensure_ascii=False)


def _keyed_request(key, model: str) -> tuple:
    """Return (custom_id, GeminiRequest for the fold) from a metadata key."""
    try:
        custom_id, client_model, renamed, stops, thinking, builtins = json.loads(key)
        server_tools = {kind: {"name": name} for kind, name in builtins.items()}
    except (ValueError, TypeError, AttributeError):  # not one of ours: the key is all there is
        return str(key), GeminiRequest(model, model, {}, False, {}, (), "", {})
    return custom_id, GeminiRequest(client_model, model, {}, False, renamed, tuple(stops),
                                    thinking, server_tools)


def _plan_batch(body, config: Config, signatures: SignatureStore) -> dict:
    """Return {Gemini model: [(metadata key, Gemini body), ...]}; 400 naming a bad request."""
    requests = body.get("requests") if isinstance(body, dict) else None
    if not isinstance(requests, list) or not requests:
        raise _bad_request("requests: must be a non-empty array")
    if len(requests) > MAX_BATCH_REQUESTS:
        raise _bad_request(f"requests: at most {MAX_BATCH_REQUESTS} per batch, "
                          f"this one has {len(requests)}")
    by_model, seen = {}, set()
    for i, item in enumerate(requests):
        custom_id = item.get("custom_id") if isinstance(item, dict) else None
        if not isinstance(custom_id, str) or not CUSTOM_ID_RE.match(custom_id):
            raise _bad_request(f"requests.{i}.custom_id: must be 1-64 letters, digits, _ or -")
        if custom_id in seen:
            raise _bad_request(f"requests.{i}.custom_id: {custom_id!r} is used twice")
        seen.add(custom_id)
        where = f"requests.{i} (custom_id {custom_id!r}): params"
        params = item.get("params")
        if not isinstance(params, dict):
            raise _bad_request(f"{where}: must be an object")
        if params.get("stream"):
            raise _bad_request(f"{where}.stream: batch requests cannot stream")
        try:
            request = to_gemini_request(params, config, signatures)
        except ProxyError as error:
            raise _bad_request(f"{where}.{error.message}")
        by_model.setdefault(request.model, []).append((_request_key(custom_id, request),
                                                       request.body))
    return by_model


def _batch_counts(metas: list, ended: bool) -> dict:
    """Return Anthropic request_counts from the Gemini batches' batchStats."""
    counts = dict.fromkeys(("processing", "succeeded", "errored", "canceled", "expired"), 0)
    for meta in metas:
        stats = meta.get("batchStats") or {}
        total = int(stats.get("requestCount") or 0)
        if not ended:  # Anthropic moves requests out of processing when the whole batch ends
            counts["processing"] += total
            continue
        succeeded = int(stats.get("successfulRequestCount") or 0)
        failed = int(stats.get("failedRequestCount") or 0)
        unanswered = max(0, total - succeeded - failed)
        counts["succeeded"] += succeeded
        counts["errored"] += failed
        counts[UNANSWERED_RESULTS.get(meta.get("state"), "errored")] += unanswered
    return counts


def _message_batch(key: bytes, operations: list, base_url: str) -> dict:
    """Return the Anthropic MessageBatch for the Gemini batch operations behind one id."""
    batch_id = BATCH_PREFIX + _encode_names(key, KIND_BATCH, [op["name"] for op in operations])
    metas = [op.get("metadata") or {} for op in operations]
    statuses = {BATCH_STATES.get(meta.get("state"), "in_progress") for meta in metas}
    status = "ended" if statuses == {"ended"} else (
        "canceling" if "canceling" in statuses else "in_progress")
    created = min(_epoch_of(meta.get("createTime")) for meta in metas)
    canceled = [_epoch_of(meta.get("updateTime")) for meta in metas
                if meta.get("state") in ("BATCH_STATE_CANCELLING", "BATCH_STATE_CANCELLED")]
    ended = max(_epoch_of(meta.get("endTime") or meta.get("updateTime")) for meta in metas)
    return {
        "id": batch_id, "type": "message_batch", "processing_status": status,
        "request_counts": _batch_counts(metas, status == "ended"),
        "created_at": _rfc3339_of(created),
        "expires_at": _rfc3339_of(created + GEMINI_FILE_SECONDS),
        "ended_at": _rfc3339_of(ended) if status == "ended" else None,
        "cancel_initiated_at": _rfc3339_of(min(canceled)) if canceled else None,
        "archived_at": None,
        "results_url": f"{base_url}/v1/messages/batches/{batch_id}/results"
        if status == "ended" else None,
    }


def _result_line(custom_id: str, result: dict) -> bytes:
    line = {"custom_id": custom_id, "result": result}
    return json.dumps(line, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def _errored(status: int, error) -> dict:
    """Return an errored result for a Gemini Status object."""
    error = error if isinstance(error, dict) else {"message": str(error)}
    code = error.get("code") if isinstance(error.get("code"), int) else status
    payload = json.dumps({"error": error}).encode()
    failure = _upstream_error(code if code >= 400 else status, payload)
    return {"type": "errored", "error": failure.body()}


class _BatchService:
    """Message Batches and Files on Gemini's Batch and Files APIs; keeps no state itself."""

    def __init__(self, upstream: UpstreamClient, config: Config, signatures: SignatureStore):
        self.upstream = upstream
        self.config = config
        self.signatures = signatures
        self.key = signatures.key

    # -- message batches ------------------------------------------------------

    def create(self, body, base_url: str) -> dict:
        """Submit one Gemini batch per model; return the MessageBatch naming them all."""
        by_model = _plan_batch(body, self.config, self.signatures)
        group, operations = secrets.token_hex(6), []
        try:
            for index, (model, requests) in enumerate(by_model.items()):
                display = _display_name(self.key, f"{group}.{index}.{len(by_model)}")
                operations.append(self._submit(model, requests, display))
        except ProxyError:
            for operation in operations:  # no half batches: the client sees one error
                self._discard(operation["name"])
            raise
        return _message_batch(self.key, operations, base_url)

    def _submit(self, model: str, requests: list, display: str) -> dict:
        inline = [{"request": body, "metadata": {"key": key}} for key, body in requests]
        batch = {"displayName": display, "inputConfig": {"requests": {"requests": inline}}}
        payload = json.dumps({"batch": batch}, separators=(",", ":"), ensure_ascii=False).encode()
        if len(payload) > self.config.batch_inline_bytes:
            lines = (json.dumps({"key": key, "request": body}, separators=(",", ":"),
                                ensure_ascii=False).encode() + b"\n" for key, body in requests)
            jsonl = self.upstream.upload(display, "application/jsonl", _iter_reader(lines))
            batch["inputConfig"] = {"fileName": jsonl["name"]}
            payload = json.dumps({"batch": batch}).encode()
        operation = self.upstream.call_json("POST", _model_path(model, "batchGenerateContent"),
                                            payload)
        stats = operation.setdefault("metadata", {}).setdefault("batchStats", {})
        stats.setdefault("requestCount", str(len(requests)))  # a new batch may not count yet
        return operation

    def _discard(self, name: str) -> None:
        for method, path in (("POST", f"/{name}:cancel"), ("DELETE", f"/{name}")):
            try:
                self.upstream.call_json(method, path, b"{}" if method == "POST" else None)
            except ProxyError as error:
                log.warning("could not remove Gemini batch %s: %s", name, error.message)

    def _operations(self, batch_id: str) -> list:
        token = batch_id[len(BATCH_PREFIX):] if batch_id.startswith(BATCH_PREFIX) else ""
        names = _decode_names(self.key, KIND_BATCH, token) if token else None
        if not names or not all(BATCH_NAME_RE.match(name) for name in names):
            raise ProxyError(404, "not_found_error", f"message batch {batch_id!r} was not found",
                             {"x-should-retry": "false"})
        return [self.upstream.call_json("GET", "/" + name) for name in names]

    def get(self, batch_id: str, base_url: str) -> dict:
        return _message_batch(self.key, self._operations(batch_id), base_url)

    def list(self, query: dict, base_url: str) -> dict:
        """Return a page of this key's batches (display names it signed), newest first."""
        groups, token = {}, ""
        for _page in range(BATCH_LIST_PAGES):
            page = self.upstream.call_json("GET", "/batches?pageSize=100" + (
                f"&pageToken={urllib.parse.quote(token)}" if token else ""))
            for operation in page.get("operations") or ():
                meta = operation.get("metadata") if isinstance(operation, dict) else None
                label = _display_label(self.key, str((meta or {}).get("displayName", "")))
                if label and BATCH_NAME_RE.match(str(operation.get("name"))):
                    groups.setdefault(label[0], {})[label[1]] = (label[2], operation)
            token = page.get("nextPageToken")
            if not token:
                break
        batches = []
        for members in groups.values():
            count = next(iter(members.values()))[0]
            if sorted(members) == list(range(count)):  # every model's part is still there
                operations = [members[i][1] for i in range(count)]
                batches.append(_message_batch(self.key, operations, base_url))
        batches.sort(key=lambda batch: batch["created_at"], reverse=True)
        return _page_by_id(batches, query)

    def cancel(self, batch_id: str, base_url: str) -> dict:
        operations = []
        for operation in self._operations(batch_id):
            meta = operation.get("metadata") or {}
            if BATCH_STATES.get(meta.get("state"), "in_progress") != "ended":
                self.upstream.call_json("POST", f"/{operation['name']}:cancel", b"{}")
                operation = self.upstream.call_json("GET", f"/{operation['name']}")
            operations.append(operation)
        batch = _message_batch(self.key, operations, base_url)
        if batch["processing_status"] == "in_progress":  # Gemini cancels asynchronously
            batch["processing_status"] = "canceling"
            batch["cancel_initiated_at"] = _rfc3339_of(int(time.time()))
        return batch

    def delete(self, batch_id: str) -> dict:
        operations = self._operations(batch_id)
        if _message_batch(self.key, operations, "")["processing_status"] != "ended":
            raise _bad_request(f"message batch {batch_id} is still processing: cancel it and "
                              "delete it once processing_status is ended")
        for operation in operations:
            self.upstream.call_json("DELETE", "/" + operation["name"])
        return {"id": batch_id, "type": "message_batch_deleted"}

    def results(self, batch_id: str):
        """Return an iterator of an ended batch's JSONL result lines; 400 before it ended."""
        operations = self._operations(batch_id)
        if _message_batch(self.key, operations, "")["processing_status"] != "ended":
            raise _bad_request(f"message batch {batch_id} has not ended: results are ready "
                              "once processing_status is ended")
        return itertools.chain.from_iterable(self._result_lines(op) for op in operations)

    def _result_lines(self, operation: dict):
        meta = operation.get("metadata") or {}
        model = str(meta.get("model") or "").rpartition("/")[2]
        answered = set()
        for key, answer in self._answers(meta.get("output") or operation.get("response") or {}):
            answered.add(key)
            custom_id, request = _keyed_request(key, model)
            message_id = hashlib.sha256(f"{operation['name']}\0{key}".encode()).hexdigest()[:24]
            yield _result_line(custom_id, self._result(request, answer, "msg_" + message_id))
        inline = ((meta.get("inputConfig") or {}).get("requests") or {}).get("requests") or ()
        for item in inline:  # requests Gemini never answered: canceled, expired or errored
            key = (item.get("metadata") or {}).get("key") if isinstance(item, dict) else None
            if key is not None and key not in answered:
                result = UNANSWERED_RESULTS.get(meta.get("state"))
                yield _result_line(_keyed_request(key, model)[0], {"type": result} if result
                                   else _errored(500, operation.get("error") or
                                                 "Gemini returned no answer for this request"))

    def _answers(self, output: dict):
        """Yield (metadata key, {response} or {error}) from inline responses or a result file."""
        inlined = (output.get("inlinedResponses") or {}).get("inlinedResponses") or ()
        for answer in inlined:
            yield (answer.get("metadata") or {}).get("key"), answer
        responses_file = str(output.get("responsesFile") or "")
        if FILE_NAME_RE.match(responses_file):
            for line in self.upstream.lines(f"/{responses_file}:download?alt=media"):
                try:
                    answer = _without_lone_surrogates(json.loads(line), line, "a batch result")
                except (ValueError, RecursionError):
                    continue  # a blank or broken line names no request
                if isinstance(answer, dict):
                    yield answer.get("key"), answer

    def _result(self, request: GeminiRequest, answer: dict, message_id: str) -> dict:
        if not isinstance(answer.get("response"), dict):
            return _errored(500, answer.get("error") or "Gemini returned no answer")
        fold = ResponseFold(request, self.signatures)
        fold.id = message_id  # the same on every download of the results
        try:
            fold.feed(answer["response"])
            fold.finish()
        except ProxyError as error:
            return {"type": "errored", "error": error.body()}
        return {"type": "succeeded", "message": fold.message()}

    # -- files ------------------------------------------------------------------

    def upload_file(self, parts: _MultipartReader) -> dict:
        """Stream the multipart field `file` to Gemini; return its FileMetadata."""
        headers = parts.next_part()
        while headers is not None and headers.get_param(
                "name", header="content-disposition") != "file":
            headers = parts.next_part()
        if headers is None:
            raise _bad_request("file: field required (a multipart/form-data part named file)")
        filename = (headers.get_filename() or "").replace("\\", "/").rpartition("/")[2]
        mime_type = headers.get_content_type() if headers.get("content-type") else (
            mimetypes.guess_type(filename)[0] or "application/octet-stream")
        gemini_file = self.upstream.upload(filename or "unnamed", mime_type,
                                           _limited(parts.read, MAX_FILE_BYTES))
        while parts.next_part() is not None:
            pass
        return _file_object(self.key, gemini_file)

    def _file_name(self, file_id: str) -> str:
        token = file_id[len(FILE_PREFIX):] if file_id.startswith(FILE_PREFIX) else ""
        fields = _decode_names(self.key, KIND_FILE, token) if token else None
        if not fields or len(fields) != 4 or not FILE_NAME_RE.match(fields[0]):
            raise ProxyError(404, "not_found_error", f"file {file_id!r} was not found",
                             {"x-should-retry": "false"})
        return fields[0]

    def _file_call(self, method: str, file_id: str) -> dict:
        try:
            return self.upstream.call_json(method, "/" + self._file_name(file_id))
        except UpstreamError as error:  # Gemini says 403 for files that are gone
            if error.upstream_status not in (403, 404):
                raise
            raise ProxyError(404, "not_found_error", f"file {file_id!r} was not found (deleted, "
                             "or past Gemini's 48 hours)", {"x-should-retry": "false"})

    def get_file(self, file_id: str) -> dict:
        return _file_object(self.key, self._file_call("GET", file_id))

    def delete_file(self, file_id: str) -> dict:
        self._file_call("DELETE", file_id)
        return {"id": file_id, "type": "file_deleted"}

    def file_content(self, file_id: str) -> None:
        self.get_file(file_id)  # a missing file is a 404 first
        raise ProxyError(403, "permission_error", f"file {file_id} is not downloadable: Gemini "
                         "does not hand uploaded files back", {"x-should-retry": "false"})

    def list_files(self, query: dict) -> dict:
        """Return one page of Gemini's files (not the batch files the proxy made itself)."""
        path = f"/files?pageSize={min(_page_limit(query), 100)}"  # Gemini's largest page
        page_token = query.get("page", [""])[0]
        if page_token.startswith("page_"):
            path += "&pageToken=" + urllib.parse.quote(page_token[5:])
        page = self.upstream.call_json("GET", path)
        data = [_file_object(self.key, f) for f in page.get("files") or () if isinstance(f, dict)
                and not str(f.get("displayName") or "").startswith(DISPLAY_PREFIX)
                and f.get("source") != "GENERATED"]
        token = page.get("nextPageToken") or ""
        return {"data": data, "has_more": bool(token),
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "next_page": f"page_{token}" if token else None}


# == HTTP handler =============================================================
# _run_fold() drives one answer for either mode; ProxyHandler routes and answers, turning any
# exception into a response in one place; _SSEStream writes one client stream; _StreamWatch
# pings idle streams and notices clients that left.

PING_FRAME = _sse_frame("ping", {"type": "ping"})

# Framing, as nginx and h11 read it: one request is exactly its bytes, never more or fewer.
REQUEST_LINE_LIMIT = 65536
HEADER_LIMIT_BYTES = 64 * 1024  # all header lines together (http.client allows 100 x 64 KiB)
HEADER_LIMIT_LINES = 100
DISCARD_LIMIT = 1024 * 1024  # an unread body thrown away so the connection can stay open
BODY_BYTES_PER_SECOND = 64 * 1024  # a body's deadline: HEADER_TIMEOUT + 1 s per 64 KiB
BODY_PIECE = 64 * 1024
HTTP_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"))
HEADER_NAME_RE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
CONTENT_LENGTH_RE = re.compile(rb"[ \t]?[0-9]{1,18}")  # one value; int() takes "+9_6 "
CHUNK_SIZE_RE = re.compile(rb"([0-9A-Fa-f]{1,15})(?:;[^\r\n]*)?\r?\n")
CONTINUE_LINE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _FramingError(Exception):
    """The request's framing is broken or ambiguous: answer `status` and close."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _ClientIO(socket.SocketIO):
    """The client socket: every read ends by `deadline`, every write within `write_timeout`."""

    def __init__(self, sock: socket.socket, write_timeout: float):
        super().__init__(sock, "rwb")
        self.deadline = time.monotonic()
        self.write_timeout = write_timeout

    def readinto(self, buffer) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:  # whatever the byte rate: a trickle does not reset the clock
            raise socket.timeout("deadline passed")
        self._sock.settimeout(remaining)
        return super().readinto(buffer)

    def write(self, data) -> int:
        self._sock.settimeout(self.write_timeout)
        self._sock.sendall(data)
        return len(data)


def _read_header_lines(rfile) -> list:
    """Return [(name, value)] of a header block as bytes; _FramingError past the limits."""
    lines, budget = [], HEADER_LIMIT_BYTES
    while True:
        line = rfile.readline(budget + 1)
        budget -= len(line)
        if budget < 0 or len(lines) >= HEADER_LIMIT_LINES and line not in (b"\r\n", b"\n"):
            raise _FramingError(431, f"request headers: more than {HEADER_LIMIT_LINES} lines "
                                    f"or {HEADER_LIMIT_BYTES} bytes")
        if not line.endswith(b"\n"):
            raise ConnectionError("client left inside the headers")
        line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        if not line:
            return lines
        name, colon, value = line.partition(b":")
        if not colon or not HEADER_NAME_RE.fullmatch(name) or b"\r" in value or b"\0" in value:
            raise _FramingError(400, "malformed header line")  # also " Name:" folds, "Name :"
        lines.append((name, value))


def _body_framing(lines: list, version: str) -> tuple:
    """Return (Content-Length or None, chunked) for header lines; _FramingError if ambiguous."""
    lengths, codings = set(), []
    for name, value in lines:
        lowered = name.lower()
        if lowered == b"content-length":
            if not CONTENT_LENGTH_RE.fullmatch(value):
                raise _FramingError(400, "Content-Length: must be one number of ASCII digits")
            lengths.add(int(value))
        elif lowered == b"transfer-encoding":
            codings.append(value.strip(b" \t").lower())
    if len(lengths) > 1:
        raise _FramingError(400, "Content-Length: the request has two different values")
    if codings and (lengths or codings != [b"chunked"] or version == "HTTP/1.0"):
        raise _FramingError(400, "Transfer-Encoding: only chunked, without Content-Length")
    if codings:
        return None, True
    return (lengths.pop() if lengths else None), False


# A parsed JSON value takes up to ~100 bytes ([{}, ...] is 3 bytes a dict of 64, plus its list
# slot), so a body is charged its length plus this per comma, counted before json.loads.
JSON_VALUE_BYTES = 96


class _InflightBytes:
    """Request bytes held at once (MAX_INFLIGHT_BYTES): a body waits briefly for room, then 529."""

    def __init__(self, limit: int, wait: float):
        self.limit = limit
        self.wait = wait
        self.held = 0
        self._room = threading.Condition(threading.Lock())

    def take(self, size: int) -> None:
        if size > self.limit:
            raise ProxyError(413, "request_too_large", f"the request takes {size} bytes to hold "
                             f"and parse; the limit is {self.limit}", {"x-should-retry": "false"})
        deadline = time.monotonic() + self.wait
        with self._room:
            while self.held + size > self.limit:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ProxyError(529, "overloaded_error", "the proxy holds too many request "
                                     "bodies (MAX_INFLIGHT_BYTES); retry shortly",
                                     {"retry-after": "1"})
                self._room.wait(remaining)
            self.held += size

    def give_back(self, size: int) -> None:
        if size:
            with self._room:
                self.held -= size
                self._room.notify_all()


class _RequestBody:
    """A request body exactly as framed (Content-Length or chunked), read once, in pieces.

    pieces() is for routes that stream a body on (uploads); read() holds it whole."""

    def __init__(self, rfile, client: _ClientIO, length: int | None, chunked: bool,
                 allowance: float, send_continue=None):
        self.rfile = rfile
        self.client = client
        self.length = length  # the declared Content-Length; None when chunked
        self.chunked = chunked
        self.received = 0
        self.chunk_left = 0  # bytes left in the current chunk
        self.done = not chunked and not length
        self.started = False
        self.broken = False  # a read failed: what follows on the connection is unknowable
        self.allowance = allowance  # HEADER_TIMEOUT: the deadline before the per-byte part
        self.begun_at = time.monotonic()
        self.send_continue = send_continue  # writes "100 Continue" when the client expects it

    def pieces(self, limit: int, size: int = BODY_PIECE):
        """Return an iterator over the body's pieces: 413 past `limit` bytes (at once if the
        declared length is past it), 408 past its deadline."""
        if self.length is not None and self.length > limit:
            raise ProxyError(413, "request_too_large", f"request body is {self.length} bytes; "
                             f"the limit is {limit}", {"x-should-retry": "false"})
        self._start()
        return self._pieces(limit, size)

    def _pieces(self, limit: int, size: int):
        try:
            while not self.done:
                piece = self._piece(size)
                if self.received > limit:
                    raise ProxyError(413, "request_too_large", f"request body is over {limit} "
                                     "bytes", {"x-should-retry": "false"})
                yield piece
        except socket.timeout:
            self.broken = True
            raise ProxyError(408, "timeout_error", "the request body did not arrive in time "
                             "(HEADER_TIMEOUT plus 1 s per 64 KiB)") from None
        except _FramingError as error:
            self.broken = True
            raise ProxyError(error.status, "invalid_request_error", str(error)) from None
        except (OSError, _ClientGone):  # reset, or closed mid-body: the client left
            self.broken = True
            raise _ClientGone() from None

    def read(self, limit: int) -> bytes:
        """Return the whole body (413 past `limit`)."""
        if self.length is not None and self.length <= limit:
            return b"".join(self.pieces(limit, self.length))
        return b"".join(self.pieces(limit))

    def discard(self, byte_budget: int, seconds: float) -> bool:
        """Read and drop what is left, within a budget; return True if the body ended."""
        if self.length is not None and self.length - self.received > byte_budget:
            return False
        if self.broken or self.send_continue is not None and not self.started:
            return False  # broken, or the client waits for our word and may never send it
        self.started = True
        self.allowance, self.begun_at = seconds, time.monotonic()
        try:
            while not self.done and byte_budget > 0:
                byte_budget -= len(self._piece(BODY_PIECE, per_byte=False))
        except (OSError, _FramingError, ProxyError, _ClientGone):
            return False
        return self.done

    def _start(self) -> None:
        if not self.started:
            self.started = True
            self.begun_at = time.monotonic()
            if self.send_continue is not None:
                self.send_continue()

    def _piece(self, size: int, per_byte: bool = True) -> bytes:
        expected = self.length if self.length is not None else self.received + size
        self.client.deadline = (self.begun_at + self.allowance
                                + (expected / BODY_BYTES_PER_SECOND if per_byte else 0))
        piece = self._read_chunked(size) if self.chunked else self._read_exact(size)
        self.received += len(piece)
        return piece

    def _read_exact(self, size: int) -> bytes:
        piece = self.rfile.read(min(size, self.length - self.received))
        if not piece:
            raise _ClientGone()
        if self.received + len(piece) == self.length:
            self.done = True
        return piece

    def _read_chunked(self, size: int) -> bytes:
        if not self.chunk_left:
            match = CHUNK_SIZE_RE.fullmatch(self.rfile.readline(1024))
            if not match:
                raise _FramingError(400, "Transfer-Encoding: malformed chunk size line")
            self.chunk_left = int(match.group(1), 16)
            if not self.chunk_left:
                _read_header_lines(self.rfile)  # the trailer section, ignored
                self.done = True
                return b""
        piece = self.rfile.read(min(size, self.chunk_left))
        if not piece:
            raise _ClientGone()
        self.chunk_left -= len(piece)
        if not self.chunk_left and self.rfile.read(2) not in (b"\r\n",):
            raise _FramingError(400, "Transfer-Encoding: a chunk does not end with CRLF")
        return piece



class Cancel:
    """Cuts the client's current upstream call when the client leaves (while Gemini works on
    it, or while its answer streams), and refuses any later one, so a client that left is
    never retried for."""

    def __init__(self):
        self.cancelled = False
        self.answer = None
        self.conn = None
        self._lock = threading.Lock()

    def connecting(self, conn) -> None:
        """Note the connection a request goes out on; raise _ClientGone once cancelled."""
        with self._lock:
            self.conn = conn
            cancelled = self.cancelled
        if cancelled:
            raise _ClientGone()

    def attach(self, answer: UpstreamAnswer) -> None:
        with self._lock:
            self.answer = answer
            cancelled = self.cancelled
        if cancelled:
            answer.abort()
            raise _ClientGone()

    def __call__(self) -> None:
        with self._lock:
            self.cancelled = True
            answer, conn = self.answer, self.conn
        if answer is not None:
            answer.abort()
        if conn is not None:  # Gemini may still be working on it
            _cut(conn)


def _run_fold(open_answer, fold: ResponseFold, send, live: bool, cancel: Cancel) -> None:
    """Feed Gemini's answer into the fold, handing each chunk's events to send() as they
    come; an empty or malformed answer is asked for once more while nothing was sent.

    open_answer(request, reason) returns (Gemini's answer, the request it answered:
    _SelfHealing may have changed it or sent it to a fallback model)."""
    for attempt in (0, 1):
        reason = "first" if not attempt else (
            "retry_malformed" if fold.finish_reason in RETRY_FINISH_REASONS else "retry_empty")
        if attempt:
            log.debug("Gemini answered %s with nothing usable; asking once more",
                      fold.finish_reason)
            fold.next_attempt()
        if cancel.cancelled:  # the client left: no call for it, retry or not
            raise _ClientGone()
        answer, fold.request = open_answer(fold.request, reason)
        cancel.attach(answer)
        try:
            send([])  # a stream's head and message_start: Gemini accepted the request
            for chunk in answer.chunks():
                send(fold.feed(chunk))
                if fold.done:
                    break
        finally:
            answer.close()
        if not fold.retryable():
            return


def _discard_events(events: list, end: bool = False) -> None:
    """The send() of a non-stream answer: its events are folded into fold.message()."""


class _SSEStream:
    """One client's SSE response: the head and message_start with the first write, then
    chunked frames, each batch in one write(); pingable from the watch thread."""

    def __init__(self, write, abort, head, preamble: list, chunked: bool = True):
        self.write = write  # bytes -> None; raises OSError once the client is gone
        self.on_abort = abort  # cuts the upstream read
        self.head = head  # () -> the response head: made at the first write, once the model
        # that answers is known
        self.chunked = chunked  # False for HTTP/1.0 clients: the close ends the stream
        self.preamble = b"".join(_sse_frame(name, data) for name, data in preamble)
        self.started = False
        self.sent = 0  # event bytes written: where an error cut the stream
        self.finished = False
        self.gone = False
        self.last_write = time.monotonic()
        self.lock = threading.Lock()

    def send(self, events: list, end: bool = False) -> None:
        """Write events (the head and message_start first, if not yet sent)."""
        body = b"".join(_sse_frame(name, data) for name, data in events)
        with self.lock:
            if self.gone:
                raise _ClientGone()
            self._write(body, end)

    def ping(self) -> None:
        """Write a ping unless a write is under way (the watch thread never waits for one)."""
        if not self.lock.acquire(blocking=False):
            return
        try:
            if not (self.gone or self.finished):
                self._write(PING_FRAME, False)
        finally:
            self.lock.release()

    def claim_unstarted(self) -> bool:
        """Return True, and stop pings, if nothing was written yet: an HTTP error can still go."""
        with self.lock:
            if self.started:
                return False
            self.finished = True
            return True

    def _write(self, body: bytes, end: bool) -> None:
        out = b""
        if not self.started:
            self.started = True
            out, body = self.head(), self.preamble + body
        if body:
            out += b"%x\r\n%s\r\n" % (len(body), body) if self.chunked else body
            self.sent += len(body)
        if end:
            out += b"0\r\n\r\n" if self.chunked else b""
            self.finished = True
        if not out:
            return
        try:
            self.write(out)
        except (OSError, ValueError):
            self.abort()
            raise _ClientGone() from None
        self.last_write = time.monotonic()

    def abort(self) -> None:
        """The client left: cut the upstream read at once."""
        self.gone = True
        self.on_abort()


POLL_EVENTS = select.POLLIN | select.POLLOUT if hasattr(select, "poll") else 0
POLL_GONE = (select.POLLHUP | select.POLLERR | select.POLLNVAL) if hasattr(select, "poll") else 0
PEEK_FLAGS = socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)


def _socket_states(socks: list) -> tuple:
    """Return (readable, hung up, writable) sets of the sockets' descriptors, at once.

    poll() watches any descriptor; select() (the fallback where there is no poll) stops at
    FD_SETSIZE, so with 1,000 streams some clients would go unwatched."""
    if not POLL_EVENTS:
        fds = [sock.fileno() for sock in socks]
        readable, writable, _ = select.select(fds, fds, [], 0)
        return set(readable), set(), set(writable)
    poller = select.poll()
    for sock in socks:
        poller.register(sock.fileno(), POLL_EVENTS)
    readable, gone, writable = set(), set(), set()
    for fd, events in poller.poll(0):
        if events & POLL_GONE:
            gone.add(fd)
        elif events & select.POLLIN:
            readable.add(fd)
        if events & select.POLLOUT:
            writable.add(fd)
    return readable, gone, writable


def _client_left(sock: socket.socket) -> bool:
    """Return True if a readable client socket is at its end (a peek gives nothing)."""
    try:
        return sock.recv(1, PEEK_FLAGS) == b""
    except (BlockingIOError, InterruptedError, socket.timeout):
        return False
    except OSError:
        return True


class _StreamWatch:
    """One thread for all streams: pings the idle ones and aborts those whose client left.

    It never blocks on a stream: a stream busy writing (its lock held) or whose client's
    window is full is skipped this round; its own write has WRITE_TIMEOUT."""

    def __init__(self, interval: float):
        self.interval = interval
        self.streams: dict = {}  # _SSEStream -> the client's socket
        self.waiting: dict = {}  # Cancel of a non-stream request -> the client's socket
        self._lock = threading.Lock()
        self._thread = None

    def add(self, sock: socket.socket, stream: _SSEStream) -> None:
        with self._lock:
            self.streams[stream] = sock
            self._start()

    def add_waiting(self, sock: socket.socket, cancel: Cancel) -> None:
        """Watch a non-stream client while Gemini answers: leaving cancels the call."""
        with self._lock:
            self.waiting[cancel] = sock
            self._start()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="stream-watch", daemon=True)
            self._thread.start()

    def remove(self, stream: _SSEStream) -> None:
        with self._lock:
            self.streams.pop(stream, None)

    def remove_waiting(self, cancel: Cancel) -> None:
        with self._lock:
            self.waiting.pop(cancel, None)

    def _run(self) -> None:
        tick = max(0.02, min(1.0, self.interval / 4))  # a client that left is seen within it
        while True:
            time.sleep(tick)
            with self._lock:
                streams, waiting = list(self.streams.items()), list(self.waiting.items())
            if streams:
                self.check(streams, time.monotonic())
            if waiting:
                self.check_waiting(waiting)

    def check_waiting(self, waiting: list) -> None:
        """Cancel the upstream calls of the non-stream clients that left."""
        left, _ = _partition_clients(waiting)
        for cancel in left:
            cancel()

    def check(self, streams: list, now: float) -> None:
        """Abort the streams whose client left; ping the idle ones that can take it now."""
        left, staying = _partition_clients(streams)
        for stream in left:
            stream.abort()
        for stream, writable in staying:
            if writable and now - stream.last_write >= self.interval:
                try:
                    stream.ping()
                except _ClientGone:
                    pass


def _partition_clients(pairs: list) -> tuple:
    """Split (item, client socket) pairs into (items whose client left, [(item, writable
    now)] for the rest); a socket closed meanwhile waits for the next round."""
    pairs = [(item, sock) for item, sock in pairs if sock.fileno() >= 0]  # being closed
    try:
        readable, gone, writable = _socket_states([sock for _, sock in pairs])
    except (OSError, ValueError):  # a socket closed meanwhile: next round
        return [], []
    left, staying = [], []
    for item, sock in pairs:
        fd = sock.fileno()
        if fd in gone or fd in readable and _client_left(sock):
            left.append(item)
        else:
            staying.append((item, fd in writable))
    return left, staying


# Claude Code's attribution headers, shown on the access line so an operator can add up a
# session or an agent's cost.
CALLER_HEADERS = (("x-claude-code-session-id", "session"), ("x-claude-code-agent-id", "agent"),
                  ("x-claude-code-parent-agent-id", "parent"))
LOG_WORD_RE = re.compile(r"[^A-Za-z0-9._:-]")


class _EscapeLogArguments(logging.Filter):
    """Escape control and non-ASCII characters in a log line's arguments: a path, a model
    name or a Gemini message quoting the prompt can never start a forged line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(
                isinstance(a, str) and not (a.isascii() and a.isprintable()) for a in record.args):
            record.args = tuple(ascii(a)[1:-1] if isinstance(a, str) and not (
                a.isascii() and a.isprintable()) else a for a in record.args)
        return True


LOG_ESCAPE = _EscapeLogArguments()


def _log_word(value: str) -> str:
    """Return a client-sent value safe for one field of a log line (no spaces, no newlines)."""
    return LOG_WORD_RE.sub("?", value[:80])


ROUTES = {  # path, where {id} stands for any one segment -> {method: serve_<action>}
    "/": {"GET": "health"},  # Claude Code warms its connection with HEAD /
    "/v1/messages": {"POST": "messages"},
    "/v1/messages/count_tokens": {"POST": "count_tokens"},
    "/v1/messages/batches": {"POST": "create_batch", "GET": "list_batches"},
    "/v1/messages/batches/{id}": {"GET": "get_batch", "DELETE": "delete_batch"},
    "/v1/messages/batches/{id}/cancel": {"POST": "cancel_batch"},
    "/v1/messages/batches/{id}/results": {"GET": "batch_results"},
    "/v1/files": {"POST": "upload_file", "GET": "list_files"},
    "/v1/files/{id}": {"GET": "get_file", "DELETE": "delete_file"},
    "/v1/files/{id}/content": {"GET": "file_content"},
    "/v1/models": {"GET": "list_models"},
    "/v1/models/{id}": {"GET": "get_model"},
    "/health": {"GET": "health"},
    "/metrics": {"GET": "metrics"},
}


def _match_route(path: str) -> tuple:
    """Return (route, {method: action}, the {id} segment) for a path; ("", None, "") if none."""
    methods = ROUTES.get(path)
    if methods is not None:
        return path, methods, ""
    segments = path.split("/")
    for i in range(2, len(segments)):  # one dict lookup per segment: no pattern matching
        if segments[i]:
            route = "/".join(segments[:i] + ["{id}"] + segments[i + 1:])
            methods = ROUTES.get(route)
            if methods is not None:
                return route, methods, urllib.parse.unquote(segments[i])
    return "", None, ""


class ProxyHandler(BaseHTTPRequestHandler):
    """Serves the Anthropic routes; one instance per client connection."""

    protocol_version = "HTTP/1.1"  # keep-alive
    server_version = f"claude_gemini_proxy/{__version__}"
    sys_version = ""

    def setup(self) -> None:
        config = self.server.config
        self.connection = self.request
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client_io = _ClientIO(self.connection, config.write_timeout)
        self.client_io.deadline = time.monotonic() + config.header_timeout
        self.rfile = io.BufferedReader(self.client_io, BODY_PIECE)
        self.wfile = self.client_io
        self.served = 0
        self.body = None
        self.linger = False  # input may be left unread: let the answer out before closing

    def handle_one_request(self) -> None:
        """Wait for a request, read its head within the limits, answer it, settle its body."""
        config = self.server.config
        self.close_connection = True
        if self.served:  # keep-alive: the next request may start within IDLE_TIMEOUT
            self.client_io.deadline = time.monotonic() + config.idle_timeout
            try:
                if not self.rfile.peek(1):
                    return
            except OSError:
                return  # idle too long or reset: close without a word, as nginx does
            self.client_io.deadline = time.monotonic() + config.header_timeout
        self.served += 1
        self.request_id = "req_" + secrets.token_hex(12)
        self.command, self.path, self.body = "", "", None
        try:
            self.read_request_head()
        except _FramingError as error:
            self.linger = True
            self.send_error(error.status, str(error))
            return
        except socket.timeout:
            self.send_error(408, "the request headers did not arrive within HEADER_TIMEOUT")
            return
        except (OSError, ValueError):
            return  # the client left mid-request
        self.handle_request(self.command)
        if not self.body.done:
            self.close_connection = True

    def read_request_head(self) -> None:
        """Set command, path, headers and body from the request; _FramingError if malformed."""
        line = self.rfile.readline(REQUEST_LINE_LIMIT + 1)
        if not line.endswith(b"\n"):
            if len(line) > REQUEST_LINE_LIMIT:
                raise _FramingError(414, "the request line is too long")
            raise ConnectionError("client left")
        self.requestline = line.rstrip(b"\r\n").decode("latin-1")
        words = self.requestline.split()
        if len(words) == 2:
            raise _FramingError(400, "HTTP/0.9 requests are not served")
        if len(words) != 3:
            raise _FramingError(400, "malformed request line")
        self.command, self.path, version = words
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise _FramingError(505 if version[:6] in ("HTTP/2", "HTTP/3") else 400,
                               f"{version[:20]!r} is not served: speak HTTP/1.1")
        self.request_version = version
        lines = _read_header_lines(self.rfile)
        length, chunked = _body_framing(lines, version)
        headers = http.client.HTTPMessage()
        for field, raw in lines:
            headers[field.decode("latin-1")] = raw.strip(b" \t").decode("latin-1")
        self.headers = headers
        if version == "HTTP/1.1" and len(headers.get_all("host") or ()) != 1:
            raise _FramingError(400, "Host: an HTTP/1.1 request needs exactly one")
        self.close_connection = (
            version == "HTTP/1.0" or "close" in (headers.get("connection") or "").lower()
        )
        if self.command not in HTTP_METHODS:
            raise _FramingError(501, f"method {self.command[:20]!r} is not served")
        expects = (headers.get("expect") or "").lower() == "100-continue"
        self.body = _RequestBody(self.rfile, self.client_io, length, chunked,
                                self.server.config.header_timeout,
                                self._send_continue if expects and version == "HTTP/1.1" else None)

    def _send_continue(self) -> None:
        self.wfile.write(CONTINUE_LINE)

    def finish(self) -> None:
        super().finish()
        if self.close_connection and self.linger:
            self._linger()

    def _linger(self) -> None:
        """Read and drop what the client still sends, so it sees our answer, not a reset."""
        connection = self.connection
        deadline = time.monotonic() + self.server.config.discard_timeout
        try:
            connection.shutdown(socket.SHUT_WR)
            while time.monotonic() < deadline:
                connection.settimeout(max(0.001, deadline - time.monotonic()))
                if not connection.recv(BODY_PIECE):
                    return
        except OSError:
            pass

    def handle_request(self, method: str) -> None:
        server = self.server
        self.request_id = "req_" + secrets.token_hex(12)
        threading.current_thread().name = self.request_id  # every log line shows it
        self.started_at = time.monotonic()
        self.stream = None
        self.status, self.gemini_model, self.usage, self.prompt_tokens = 0, "-", None, 0
        self.held_bytes = 0
        with server.lock:
            server.active_requests += 1
        try:
            if server.draining:
                self.close_connection = True
            self.route(method)
        except Exception as exc:  # the one place an exception becomes a response
            self.answer_error(exc)
        finally:
            server.inflight.give_back(self.held_bytes)
            with server.lock:
                server.active_requests -= 1
            self.log_access(method)

    def answer_error(self, exc: Exception) -> None:
        """Answer an exception: the JSON error while nothing was sent, else an SSE error
        event, the terminating chunk and a closed connection; never a second status line."""
        if isinstance(exc, _ClientGone):
            self.close_connection = True
            self.status = 499  # client closed the connection
            log.debug("answering 499: the client closed the connection")
            return
        if not isinstance(exc, ProxyError):
            log.exception("request %s failed", self.request_id)
            exc = ProxyError(500, "api_error", f"the proxy failed on this request "
                             f"({self.request_id})")
        body = exc.body(self.request_id)
        cut = self.stream is not None and self.stream.started
        log.debug("answering %d %s %s: %s", exc.status, exc.error_type,
                  f"as an SSE error event, the stream cut after {self.stream.sent} bytes of "
                  "events" if cut else "before any of the answer was sent", exc.message)
        if self.stream is None or self.stream.claim_unstarted():
            self.send_json(exc.status, body, exc.headers)
            return
        self.close_connection = True
        self.status = exc.status
        try:
            self.stream.send([("error", body)], end=True)
        except _ClientGone:
            self.status = 499

    def route(self, method: str) -> None:
        parts = urllib.parse.urlsplit(self.path)
        path = parts.path
        self.route_name, methods, self.path_id = _match_route(path)
        if methods is None:
            raise ProxyError(404, "not_found_error", f"no route for {path}")
        action = methods.get("GET" if method == "HEAD" else method)  # HEAD follows GET's rules
        if action is None:
            raise ProxyError(405, "invalid_request_error", f"{method} is not allowed on {path}",
                             {"Allow": ", ".join(methods)})
        if action != "health":
            self.authorize()
        getattr(self, "serve_" + action)(path, urllib.parse.parse_qs(parts.query))

    def authorize(self) -> None:
        token = self.server.config.proxy_auth_token
        if not token:
            return
        offered = [self.headers.get("x-api-key") or ""]
        authorization = self.headers.get("authorization") or ""
        if authorization[:7].lower() == "bearer ":
            offered.append(authorization[7:].strip())
        if not any(hmac.compare_digest(o.encode(), token.encode()) for o in offered if o):
            present = sorted({name.lower() for name in self.headers.keys()})
            log.info("401: no valid proxy token; the request had headers %s (values not logged)",
                     json.dumps(present))
            raise ProxyError(
                401,
                "authentication_error",
                "invalid proxy token: send PROXY_AUTH_TOKEN "
                "as x-api-key or Authorization: Bearer",
                {"x-should-retry": "false"},
            )

    # -- routes -------------------------------------------------------------------

    def serve_health(self, path: str, query: dict) -> None:
        self.send_json(200, {"status": "ok"})

    def serve_metrics(self, path: str, query: dict) -> None:
        server = self.server
        upstream = server.upstream
        gauges = {
            "upstream_retries_total": ("counter", "Upstream calls retried.", upstream.retries),
            "upstream_connections_opened_total": (
                "counter",
                "Upstream connections opened.",
                upstream.connections_opened,
            ),
            "keys_resting": (
                "gauge",
                "Gemini keys resting after a 429.",
                upstream.keys.resting_count(),
            ),
            "streams_open": ("gauge", "Client streams in flight.", len(server.watch.streams)),
            "requests_in_flight": ("gauge", "Requests being served.", server.active_requests),
            "connections_open": ("gauge", "Client connections open.", server.connections),
            "connections_refused_total": (
                "counter", "Connections answered 529 past MAX_CONNECTIONS.",
                server.connections_refused),
            "signatures_cached": (
                "gauge",
                "Entries in the signature LRU.",
                len(server.signatures),
            ),
        }
        self.send_bytes(200, server.metrics.render(gauges).encode(), "text/plain; version=0.0.4")

    def serve_list_models(self, path: str, query: dict) -> None:
        self.send_json(200, _page_models(self.server.models.models(), query))

    def serve_get_model(self, path: str, query: dict) -> None:
        model_id = urllib.parse.unquote(path[len("/v1/models/"):])
        for model in self.server.models.models():
            if model["id"] == model_id:
                self.send_json(200, model)
                return
        raise ProxyError(404, "not_found_error", f"model: {model_id} was not found")

    def serve_count_tokens(self, path: str, query: dict) -> None:
        request = self.server.healing.translate(self.read_json())  # as generation would send it
        self.gemini_model = request.model
        inner = {"model": f"models/{request.model}"}
        for key in ("contents", "systemInstruction", "tools", "toolConfig"):
            if key in request.body:
                inner[key] = request.body[key]
        headers = {"x-gemini-model": request.model}
        try:
            answer = self.server.upstream.call_json(
                "POST", _model_path(request.model, "countTokens"),
                {"generateContentRequest": inner}
            )
            tokens = int(answer.get("totalTokens") or 0)
        except ProxyError as error:
            if not isinstance(error, UpstreamError) or error.upstream_status != 404:
                raise
            tokens = (
                len(json.dumps(inner, separators=(",", ":"))) // BYTES_PER_TOKEN
            )  # a gateway without countTokens
            headers["x-token-count-estimated"] = "true"
        self.send_json(200, {"input_tokens": tokens}, headers)

    def serve_messages(self, path: str, query: dict) -> None:
        server = self.server
        body = self.read_json()
        request = server.healing.translate(body)
        self.gemini_model = request.model
        fold = ResponseFold(request, server.signatures)
        # Search and fetch answers come whole (their blocks go first); stop sequences are cut here,
        # so they are read as a stream to stop Gemini at the match.
        live = server.config.stream_mode == "live" and not request.whole_answer and (
            request.stream or bool(request.stop_sequences))
        cancel = Cancel()

        def open_answer(request: GeminiRequest, reason: str) -> tuple:
            answer, request = server.healing.open(server.upstream, request, body, live, reason,
                                                  cancel)
            self.gemini_model = request.model  # the model that answers, for the access log
            return answer, request

        if not request.stream:
            self.answer_whole(fold, open_answer, live, cancel)
            return
        self.stream = _SSEStream(self.wfile.write, cancel, lambda: self.stream_head(fold),
                                 fold.start(), self.request_version != "HTTP/1.0")
        server.watch.add(self.connection, self.stream)
        try:
            _run_fold(open_answer, fold, self.stream.send, live, cancel)
            self.stream.send(fold.finish(), end=True)
        finally:
            server.watch.remove(self.stream)
        self.status = 200
        self.note_answer(fold)

    def answer_whole(self, fold: ResponseFold, open_answer, live: bool, cancel: Cancel) -> None:
        """Answer a non-stream request; the watch cancels Gemini's call if the client leaves."""
        server = self.server
        server.watch.add_waiting(self.connection, cancel)
        try:
            _run_fold(open_answer, fold, _discard_events, live, cancel)
        finally:
            server.watch.remove_waiting(cancel)
        fold.finish()
        self.note_answer(fold)  # before the answer goes: the client's next request follows it
        self.send_json(200, fold.message(), {"x-gemini-model": fold.request.model})

    def note_answer(self, fold: ResponseFold) -> None:
        """Keep what a finished answer tells: its model and tokens for the access log and
        /metrics, and the Gemini model that served it for the self-healing rules."""
        self.gemini_model = fold.request.model
        self.usage, self.prompt_tokens = fold.usage(), fold.prompt_tokens()
        self.server.healing.note_served(fold.request.model, fold.model_version)

    def stream_head(self, fold: ResponseFold) -> bytes:
        """Return the head of an SSE response, naming the model that answers; HTTP/1.0 has no
        chunks, so its stream ends with the close."""
        headers = {"x-gemini-model": fold.request.model, "Cache-Control": "no-cache"}
        if self.request_version != "HTTP/1.0":
            headers["Transfer-Encoding"] = "chunked"
        return self.response_head(200, "text/event-stream", None, headers)

    # -- batches and files --------------------------------------------------------

    def serve_create_batch(self, path: str, query: dict) -> None:
        body = self.read_json(MAX_BATCH_BYTES)
        self.send_json(200, self.server.batches.create(body, self.base_url()))

    def serve_list_batches(self, path: str, query: dict) -> None:
        self.send_json(200, self.server.batches.list(query, self.base_url()))

    def serve_get_batch(self, path: str, query: dict) -> None:
        self.send_json(200, self.server.batches.get(self.path_id, self.base_url()))

    def serve_cancel_batch(self, path: str, query: dict) -> None:
        self.send_json(200, self.server.batches.cancel(self.path_id, self.base_url()))

    def serve_delete_batch(self, path: str, query: dict) -> None:
        self.send_json(200, self.server.batches.delete(self.path_id))

    def serve_batch_results(self, path: str, query: dict) -> None:
        self.send_lines(self.server.batches.results(self.path_id))

    def serve_upload_file(self, path: str, query: dict) -> None:
        boundary = _multipart_boundary(self.headers.get("content-type") or "")
        read = self.body_stream(MAX_FILE_BYTES + MULTIPART_OVERHEAD)
        try:
            metadata = self.server.batches.upload_file(_MultipartReader(read, boundary))
        except ProxyError:
            self.close_connection = True  # the rest of the body was not read
            raise
        self.send_json(200, metadata)

    def serve_list_files(self, path: str, query: dict) -> None:
        self.send_json(200, self.server.batches.list_files(query))

    def serve_get_file(self, path: str, query: dict) -> None:
        self.send_json(200, self.server.batches.get_file(self.path_id))

    def serve_delete_file(self, path: str, query: dict) -> None:
        self.send_json(200, self.server.batches.delete_file(self.path_id))

    def serve_file_content(self, path: str, query: dict) -> None:
        self.server.batches.file_content(self.path_id)

    def base_url(self) -> str:
        """Return the URL clients reach this proxy at (behind a proxy: X-Forwarded-*)."""
        proto = self.headers.get("x-forwarded-proto") or "http"
        host = self.headers.get("x-forwarded-host") or self.headers.get("host") or (
            "%s:%d" % self.server.server_address[:2])
        return f"{proto}://{host}"

    # -- reading and writing ---------------------------------------------------

    def read_json(self, limit: int = 0):
        """Return the parsed JSON body; raise ProxyError for a missing, huge or broken one."""
        data = self.read_body(limit)
        self.hold(JSON_VALUE_BYTES * data.count(b","))  # what the parsed values will take
        return _decode_json_body(data)

    def body_stream(self, limit: int):
        """Return read(n) over the request body for routes that stream it on: each call gives
        the next piece (up to 64 KiB), b"" at the end; 411, 413 and 408 as read_body()."""
        self._check_framed()
        pieces = self.body.pieces(limit)
        return lambda _size: next(pieces, b"")

    def read_body(self, limit: int = 0) -> bytes:
        """Return the whole request body, held within MAX_INFLIGHT_BYTES; 411 without framing."""
        self._check_framed()
        body, limit = self.body, limit or self.server.config.max_request_bytes
        if body.length is not None:
            self.hold(body.length if body.length <= limit else 0)  # past the limit: 413 next
            data = body.read(limit)
        else:
            pieces = []
            for piece in body.pieces(limit):
                self.hold(len(piece))
                pieces.append(piece)
            data = b"".join(pieces)
        self.body_size = len(data)
        return data

    def hold(self, size: int) -> None:
        self.server.inflight.take(size)
        self.held_bytes += size

    def _check_framed(self) -> None:
        if self.body.length is None and not self.body.chunked:
            raise ProxyError(411, "invalid_request_error",
                             "send the body with a Content-Length (or chunked)")

    def settle_body(self) -> None:
        """Before an answer: drop a body the route did not read (1 MiB, 5 s), or close after."""
        config = self.server.config
        if not self.body.discard(DISCARD_LIMIT, config.discard_timeout):
            self.close_connection = True
            self.linger = True

    def response_head(
        self, status: int, content_type: str, length: int | None, headers: dict | None
    ) -> bytes:
        if self.body is not None and not self.body.done:
            self.settle_body()  # leftover body bytes must never be read as the next request
        phrase = self.responses.get(status, ("",))[0]
        lines = [f"HTTP/1.1 {status} {phrase}", f"Server: {self.server_version}",
                 f"Content-Type: {content_type}", f"request-id: {self.request_id}"]
        if length is not None:
            lines.append(f"Content-Length: {length}")
        if self.close_connection:
            lines.append("Connection: close")
        for name, value in (headers or {}).items():
            value = str(value)
            if not (value.isascii() and value.isprintable()):  # a CR/LF would start a header
                raise _bad_request(f"{name}: {ascii(value)} cannot be sent as a header value")
            lines.append(f"{name}: {value}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def send_bytes(
        self, status: int, body: bytes, content_type: str, headers: dict | None = None
    ) -> None:
        """Write headers and body in one write: two small writes meet the client's delayed ACK."""
        head = self.response_head(status, content_type, len(body), headers)
        self.status = status
        try:
            self.wfile.write(head if self.command == "HEAD" else head + body)
        except OSError:
            self.close_connection = True

    def send_lines(self, lines) -> None:
        """Write JSONL lines as a chunked 200; a failure after the first line cuts the body."""
        lines = iter(lines)
        pending = [next(lines, b"")]  # an error before any output is still an HTTP error
        self.status = 200
        chunked = self.request_version != "HTTP/1.0"  # 1.0 has no chunks: the close ends it
        try:
            self.wfile.write(self.response_head(200, "application/x-jsonl", None, {
                "Transfer-Encoding": "chunked"} if chunked else {}))
            if self.command == "HEAD":  # the head GET would get; a body would be misread
                return
            for line in itertools.chain(lines, [b""]):
                pending.append(line)
                if len(pending) >= 256 or not line:  # a few lines per write, the rest at the end
                    body, pending = b"".join(pending), []
                    if body:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(body), body) if chunked else body)
            self.wfile.write(b"0\r\n\r\n" if chunked else b"")
        except ProxyError as error:
            log.warning("batch results cut short: %s", error.message)
            self.close_connection = True
        except OSError:
            self.close_connection = True

    def send_json(self, status: int, body: dict, headers: dict | None = None) -> None:
        self.send_bytes(
            status,
            json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode(),
            "application/json",
            headers,
        )

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """Answer a request that cannot be framed (request line, headers, 408) and close."""
        self.request_id = getattr(self, "request_id", "req_" + secrets.token_hex(12))
        self.stream = None
        self.close_connection = True
        error_type = "not_found_error" if code == 404 else "invalid_request_error"
        self.answer_error(ProxyError(code, error_type, message or "bad request"))

    def log_access(self, method: str) -> None:
        path = self.path.split("?")[0]
        route = getattr(self, "route_name", "") or "other"
        if self.status == 200 and self.gemini_model != "-":
            self.server.metrics.accept_model(self.gemini_model)  # Gemini answered with it
        self.server.metrics.count_request(route, self.status, self.gemini_model, self.usage)
        usage = self.usage or {}
        tokens = " ".join(f"{kind}={count}" for kind, count in _token_kinds(usage)) if usage \
            else "input=- cached=- output=- thinking=-"
        cached = usage.get("cache_read_input_tokens", 0)
        share = f"{cached / self.prompt_tokens:.0%}" if self.prompt_tokens else "-"
        callers = "".join(f" {field}={_log_word(self.headers[header])}"
                          for header, field in CALLER_HEADERS if self.headers.get(header))
        log.info("%s %s %d model=%s %s cache=%s%s %.0fms %s", method, path, self.status,
                 self.gemini_model, tokens, share, callers,
                 (time.monotonic() - self.started_at) * 1000, self.request_id)

    def log_message(self, format: str, *args) -> None:
        log.debug("http.server: " + format, *args)


# == Main =====================================================================
# build_server() binds and wires the parts; main() adds configuration, logging and signals.

FD_RESERVE = 32  # descriptors kept for the listener, logs, stdio, CA files, token command
ACCEPT_BACKOFF = 0.05  # seconds the accept loop rests while the process is out of descriptors
ACCEPT_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def _max_connections_for(fd_limit: int, pooled: int) -> int:
    """Return the client connections a descriptor limit allows: each may hold an upstream one."""
    return max(1, (fd_limit - FD_RESERVE - pooled) // 2)


def _fd_limit() -> int:
    if resource is None:
        return 1024
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if 0 < soft < 1 << 20 else 1 << 20


def _overloaded_answer() -> bytes:
    body = json.dumps(ProxyError(529, "overloaded_error", "the proxy is at MAX_CONNECTIONS; "
                                 "retry shortly").body(), separators=(",", ":")).encode()
    return (b"HTTP/1.1 529 Overloaded\r\nContent-Type: application/json\r\nretry-after: 1\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


OVERLOADED_ANSWER = _overloaded_answer()


class ProxyServer(ThreadingHTTPServer):
    """The listening server and the parts its handlers share."""

    daemon_threads = True
    request_queue_size = 1024  # listen backlog: a burst of connections waits instead of failing
    allow_reuse_address = True

    def __init__(self, config: Config, sleep=time.sleep, now=time.monotonic):
        if ":" in config.host:
            self.address_family = socket.AF_INET6
        super().__init__((config.host, config.port), ProxyHandler)
        self.config = config
        self.metrics = Metrics()
        self.upstream = UpstreamClient(config, self.metrics, sleep=sleep, now=now)
        self.signatures = SignatureStore(config.signature_key)
        self.watch = _StreamWatch(config.ping_interval)
        self.models = _ModelCatalog(self.upstream, config)
        self.batches = _BatchService(self.upstream, config, self.signatures)
        self.inflight = _InflightBytes(config.max_inflight_bytes, config.inflight_wait)
        log.addFilter(LOG_ESCAPE)  # once per process: addFilter ignores a filter it has
        self.healing = _SelfHealing(config, self.signatures, self.models)
        self.lock = threading.Lock()
        self.active_requests = 0
        self.draining = False
        self.max_connections = config.max_connections or _max_connections_for(
            _fd_limit(), UpstreamClient.max_idle)
        self.connections = 0
        self.connections_refused = 0
        self.accept_failing = False  # one log line per episode of EMFILE/ENFILE

    def get_request(self) -> tuple:
        try:
            accepted = self.socket.accept()
        except OSError as exc:
            if exc.errno in ACCEPT_RESOURCE_ERRORS:
                if not self.accept_failing:
                    log.warning("accept() failed (%s): resting %.0f ms per try until descriptors "
                                "free up", exc.strerror, ACCEPT_BACKOFF * 1000)
                self.accept_failing = True
                time.sleep(ACCEPT_BACKOFF)  # the listener stays readable: do not spin a core
            raise
        if self.accept_failing:
            log.warning("accept() works again")
            self.accept_failing = False
        return accepted

    def process_request(self, request, client_address) -> None:
        with self.lock:
            admitted = self.connections < self.max_connections
            self.connections += admitted
            self.connections_refused += not admitted
        if not admitted:
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            with self.lock:
                self.connections -= 1
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.lock:
                self.connections -= 1

    def _refuse(self, request: socket.socket) -> None:
        """Answer past MAX_CONNECTIONS at once, without a thread: 529, then close."""
        try:
            request.setblocking(False)
            request.send(OVERLOADED_ANSWER)
            request.shutdown(socket.SHUT_WR)
            request.recv(65536)  # what already arrived, so the close sends no reset over the 529
        except OSError:
            pass
        request.close()

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host name up in DNS, which can stall start-up.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


def build_server(config: Config, sleep=time.sleep, now=time.monotonic) -> ProxyServer:
    """Return the bound (not yet serving) server for a Config; the clock is a parameter."""
    return ProxyServer(config, sleep=sleep, now=now)


def _read_dotenv(path: str | None) -> str:
    try:
        with open(path or ".env", encoding="utf-8") as dotenv:
            return dotenv.read()
    except FileNotFoundError:
        if path:
            raise ValueError(f"--env-file {path}: no such file")
        return ""


def _serve_until_signal(server: ProxyServer) -> None:
    """Serve; on SIGTERM/SIGINT stop accepting and let in-flight work finish.

    A second signal exits at once."""
    stopping = threading.Event()

    def on_signal(signum, frame):
        if stopping.is_set():
            os._exit(1)
        stopping.set()
        server.draining = True
        log.info("stopping: finishing %d in-flight request(s)", server.active_requests)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    host, port = server.server_address[:2]
    log.info("listening on http://%s:%d, upstream %s, default model %s; Claude Code: %s",
             host, port, server.config.api_base, server.config.default_model,
             _claude_code_command(Config(**dict(vars(server.config), port=port))))
    server.serve_forever(poll_interval=0.25)
    server.socket.close()
    deadline = time.monotonic() + server.config.shutdown_grace
    while server.active_requests and time.monotonic() < deadline:
        time.sleep(0.05)
    server.server_close()
    server.upstream.close()


# -- --check ------------------------------------------------------------------

CHECK_PROMPT = [{"role": "user", "parts": [{"text": "Reply with the word ok."}]}]
# Representative names of Claude Code's model tiers, routed as the proxy routes them.
CLAUDE_CODE_TIERS = (("OPUS", "claude-opus-4-8"), ("SONNET", "claude-sonnet-5"),
                     ("HAIKU", "claude-haiku-4-5"), ("FABLE", "claude-fable-5"))


class _SetupCheck:
    """`--check`: one line per check (ok, or FAIL and what to do), then Claude Code's settings."""

    def __init__(self, config: Config, write):
        self.config = Config(**dict(vars(config), max_retries=0))  # report, never wait
        self.write = write
        self.failed = 0
        proxy_passwords = [urllib.parse.urlsplit(u).password for u in
                           (config.https_proxy, config.http_proxy) if "://" in u]
        self.secrets = [s for s in (*config.api_keys, config.proxy_auth_token,
                                    *proxy_passwords) if s]

    def line(self, ok: bool, text: str, fix: str = "") -> bool:
        """Write one check's line (never a secret); return `ok`."""
        self.failed += not ok
        text = ("ok   " if ok else "FAIL ") + text + (f" -> {fix}" if fix and not ok else "")
        for secret in self.secrets:
            text = text.replace(secret, "***")
        self.write(text)
        return ok

    def run(self) -> int:
        """Run every check; return the exit status (0 when all passed)."""
        input_limit, keys = None, None
        if self.check_token_command() and self.check_base():
            keys = self.accepted_keys()
        if keys is not None:
            config = Config(**dict(vars(self.config), api_keys=keys))  # the keys that work
            upstream = UpstreamClient(config, Metrics())
            try:
                input_limit = self.check_models(upstream, _ModelCatalog(upstream, config))
                self.check_count_tokens(upstream)
            finally:
                upstream.close()
        for text in _claude_code_settings(self.config, input_limit):
            self.write(text)
        return 1 if self.failed else 0

    def check_token_command(self) -> bool:
        if not self.config.auth_command:
            return True
        try:
            _TokenCommand(self.config.auth_command, self.config.auth_ttl).get()
        except ProxyError as error:
            return self.line(False, error.message, "run the command by hand and fix it "
                             "(gcloud: `gcloud auth login`)")
        return self.line(True, "GEMINI_AUTH_COMMAND prints a token")

    def check_base(self) -> bool:
        upstream = UpstreamClient(self.config, Metrics())
        via = ""
        if upstream.egress:
            proxy_url = self.config.https_proxy if upstream.https else self.config.http_proxy
            via = f" through {proxy_url}"
        where = f"{self.config.api_base}{via}"
        try:
            upstream.call_json("GET", "/models?pageSize=1")
        except UpstreamError:
            pass  # an HTTP answer, whatever it says: the keys' check reads it
        except ProxyError as error:
            return self.line(False, f"base URL {where} does not answer: {error.message}",
                             "check GEMINI_API_BASE; behind a proxy set HTTPS_PROXY (and NO_PROXY)"
                             "; for a private CA set SSL_CERT_FILE")
        finally:
            upstream.close()
        return self.line(True, f"base URL {where} answers")

    def accepted_keys(self) -> tuple | None:
        """Check each key (or the token); return the keys Gemini accepts, None if none is."""
        if self.config.auth_command:
            ok = self.check_accepted(self.config, "the token of GEMINI_AUTH_COMMAND")
            return () if ok else None
        keys = self.config.api_keys
        accepted = tuple(
            key for i, key in enumerate(keys, 1)
            if self.check_accepted(Config(**dict(vars(self.config), api_keys=(key,))),
                                   f"key #{i} of {len(keys)}")
        )
        return accepted or None

    def check_accepted(self, config: Config, what: str) -> bool:
        upstream = UpstreamClient(config, Metrics())
        try:
            upstream.call_json("GET", "/models?pageSize=1")
        except UpstreamError as error:
            if error.upstream_status == 404:
                return self.line(True, f"{what}: this base has no model list; see the models")
            fix = "check GEMINI_AUTH_TYPE and the account" if config.auth_command else \
                "fix GEMINI_API_KEY (new keys: https://aistudio.google.com/apikey)"
            return self.line(False, f"Gemini refuses {what}: {error.message}", fix)
        except ProxyError as error:
            return self.line(False, f"{what}: {error.message}", "run --check again")
        finally:
            upstream.close()
        return self.line(True, f"Gemini accepts {what}")

    def check_models(self, upstream: UpstreamClient, catalog: _ModelCatalog) -> int | None:
        """Check each configured model generates; return the default model's input limit."""
        config = self.config
        roles = {config.default_model: "default model"}
        for _pattern, model in config.model_map:
            roles.setdefault(model, "MODEL_MAP target")
        for pair in config.model_fallbacks:
            for model in pair:
                roles.setdefault(model, "MODEL_FALLBACKS model")
        for model, role in roles.items():
            self.check_model(upstream, catalog, model, role)
        known = catalog.known(config.default_model) or {}
        return known.get("inputTokenLimit")

    def check_model(self, upstream, catalog, model: str, role: str) -> bool:
        body = {"contents": CHECK_PROMPT, "generationConfig": {"maxOutputTokens": 256}}
        try:
            answer = upstream.call_json("POST", _model_path(model, "generateContent"), body)
        except UpstreamError as error:
            if error.upstream_status == 404:
                return self.line(False, f"{role} {model} does not exist at Gemini",
                                 _not_found_message(model, catalog.closest(model)))
            return self.line(False, f"{role} {model} cannot generate: {error.message}",
                             "pick another model for it (DEFAULT_GEMINI_MODEL, MODEL_MAP)")
        except ProxyError as error:
            return self.line(False, f"{role} {model}: {error.message}", "run --check again")
        notes = []
        served = answer.get("modelVersion")
        if isinstance(served, str) and served and served != model:
            notes.append(f"served as {served}")
        try:
            limit = (catalog.gemini_models().get(model) or {}).get("inputTokenLimit")
        except ProxyError:
            limit = None
        if limit:
            notes.append(f"{limit} input tokens")
        suffix = f" ({', '.join(notes)})" if notes else ""
        return self.line(True, f"{role} {model} exists and generates{suffix}")

    def check_count_tokens(self, upstream: UpstreamClient) -> bool:
        model = self.config.default_model
        body = {"generateContentRequest": {"model": f"models/{model}", "contents": CHECK_PROMPT}}
        try:
            answer = upstream.call_json("POST", _model_path(model, "countTokens"), body)
        except UpstreamError as error:
            if error.upstream_status == 404:
                return self.line(True, "count_tokens: this base has none; the proxy estimates")
            return self.line(False, f"count_tokens fails: {error.message}",
                             "Claude Code's /context needs it; check the base URL")
        except ProxyError as error:
            return self.line(False, f"count_tokens: {error.message}", "run --check again")
        return self.line(True, f"count_tokens works ({answer.get('totalTokens')} tokens)")


def _claude_code_command(config: Config) -> str:
    """Return the one command that starts Claude Code on this proxy."""
    host = config.host if config.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    token = '"$PROXY_AUTH_TOKEN"' if config.proxy_auth_token else "anything"
    return f"ANTHROPIC_BASE_URL=http://{host}:{config.port} ANTHROPIC_AUTH_TOKEN={token} claude"


def _claude_code_settings(config: Config, input_limit: int | None) -> list:
    """Return the lines that point Claude Code at this proxy."""
    base_url, token = _claude_code_command(config).split()[:2]
    lines = ["", "Point Claude Code at this proxy:", f"export {base_url}", f"export {token}",
             f"export ANTHROPIC_DEFAULT_MODEL={config.default_model}"]
    for tier, name in CLAUDE_CODE_TIERS:
        lines.append(f"export ANTHROPIC_DEFAULT_{tier}_MODEL={map_model(name, config)}")
    if input_limit:  # Claude Code assumes 200k for names it does not know
        lines.append(f"export CLAUDE_CODE_MAX_CONTEXT_TOKENS={input_limit}")
    else:
        lines.append("# CLAUDE_CODE_MAX_CONTEXT_TOKENS: the model list gave no input limit")
    lines += ["export ENABLE_TOOL_SEARCH=true  # the proxy relays tool_reference blocks", "claude"]
    return lines


def main(argv: list | None = None) -> int:
    """Run the proxy; return the process exit status."""
    argv = sys.argv[1:] if argv is None else argv
    args, _ = _build_arg_parser().parse_known_args(argv)
    try:
        config = read_config(argv, dict(os.environ), _read_dotenv(args.env_file))
    except ValueError as exc:
        print(f"claude_gemini_proxy: {exc}", file=sys.stderr)
        return 2
    if args.check:
        return _SetupCheck(config, print).run()
    logging.basicConfig(level=logging.DEBUG if config.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s [%(threadName)s] %(message)s")
    try:
        server = build_server(config)
    except OSError as exc:
        print(
            f"claude_gemini_proxy: cannot listen on {config.host}:{config.port}: {exc}",
            file=sys.stderr,
        )
        return 1
    if server.upstream.token_command:
        try:
            server.upstream.token_command.get()
        except ProxyError as error:
            print(f"claude_gemini_proxy: {error.message}", file=sys.stderr)
            return 2
    _serve_until_signal(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
