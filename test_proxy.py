"""Tests for claude_gemini_proxy: the real proxy in-process against a fake Gemini.

Run: python3 -m pip install pytest && python3 -m pytest -q
"""
from __future__ import annotations

import base64
import http.client
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import claude_gemini_proxy as cgp

HERE = os.path.dirname(os.path.abspath(__file__))


# == Fake Gemini ==============================================================
# Records every request and answers from a script; validates what real Gemini validates.

class Reply:
    """One scripted Gemini answer: chunks (streamed or merged), or an error status."""

    def __init__(self, *chunks, status=200, error=None, pause=0.0, tail=b"", cut=False, before=0.0):
        self.chunks = list(chunks)
        self.status = status
        self.error = error  # Gemini error object for a non-200 status
        self.pause = pause  # seconds between streamed chunks
        self.before = before  # seconds before the first chunk
        self.tail = tail  # raw bytes sent after the chunks
        self.cut = cut  # end the stream without the terminating chunk


def chunk(*parts, finish=None, usage=None, grounding=None, model="gemini-3.5-flash"):
    """Return one GenerateContentResponse holding `parts`."""
    candidate = {"content": {"role": "model", "parts": list(parts)}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    if grounding:
        candidate["groundingMetadata"] = grounding
    answer = {"candidates": [candidate], "modelVersion": model, "responseId": "resp1"}
    answer["usageMetadata"] = usage or {"promptTokenCount": 10, "candidatesTokenCount": 5,
                                        "totalTokenCount": 15}
    return answer


def text(value, **extra):
    return dict({"text": value}, **extra)


def call(name, args, call_id=None, signature=None):
    part = {"functionCall": {"name": name, "args": args}}
    if call_id:
        part["functionCall"]["id"] = call_id
    if signature:
        part["thoughtSignature"] = signature
    return part


def gemini_error(code, message, status="INVALID_ARGUMENT", details=None):
    return {"code": code, "message": message, "status": status, "details": details or []}


def new_signature():
    return base64.b64encode(secrets.token_bytes(48)).decode()


class FakeGemini:
    """A ThreadingHTTPServer that answers like Gemini v1beta from a script."""

    def __init__(self):
        self.requests = []  # (method, path, headers, body)
        self.script = []  # Reply objects, used in order; empty: a default text answer
        self.issued = {}  # signature -> model that issued it
        self.sign_calls = True  # sign the first functionCall of each answer, as Gemini 3 does
        self.bypassed = 0
        self.connections = 0
        self.models = [
            {"name": "models/gemini-3.5-flash", "displayName": "Gemini 3.5 Flash", "inputTokenLimit": 1048576,
             "outputTokenLimit": 65536, "supportedGenerationMethods": ["generateContent", "countTokens"]},
            {"name": "models/gemini-3.1-pro-preview", "displayName": "Gemini 3.1 Pro",
             "inputTokenLimit": 1048576, "outputTokenLimit": 65536,
             "supportedGenerationMethods": ["generateContent"]},
            {"name": "models/embedding-001", "supportedGenerationMethods": ["embedContent"]},
        ]
        self.count_tokens_status = 200
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                with fake.lock:
                    fake.connections += 1

            def do_GET(self):
                fake.record(self, None)
                self.reply(*fake.answer_get(self.path))

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                body = json.loads(raw)
                fake.record(self, body)
                fake.respond(self, body)

            def reply(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}/v1beta"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def record(self, handler, body):
        with self.lock:
            self.requests.append((handler.command, handler.path, dict(handler.headers), body))

    @property
    def bodies(self):
        return [r[3] for r in self.requests if r[0] == "POST"]

    def answer_get(self, path):
        if path.startswith("/v1beta/models?"):
            if "pageToken=p2" in path:
                return 200, {"models": self.models[2:]}
            return 200, {"models": self.models[:2], "nextPageToken": "p2"}
        return 404, {"error": gemini_error(404, "not found", "NOT_FOUND")}

    def validate(self, path, headers, body):
        """Return the (status, error) real Gemini gives this request, or None when it is fine."""
        lower = {k.lower(): v for k, v in headers.items()}
        if not lower.get("x-goog-api-key") and not lower.get("authorization"):
            return 401, gemini_error(401, "Method doesn't allow unregistered callers.", "UNAUTHENTICATED")
        if lower.get("x-goog-api-key") and lower.get("authorization"):
            return 401, gemini_error(401, "Request had invalid authentication credentials.", "UNAUTHENTICATED")
        if ":countTokens" in path:
            body = body.get("generateContentRequest") or body
            if "model" not in body:
                return 400, gemini_error(400, "generate_content_request.model: model is not specified")
        model = path.split("/models/")[1].split(":")[0]
        contents = body.get("contents") or []
        if not contents:
            return 400, gemini_error(400, "contents is not specified")
        for tool in body.get("tools") or ():
            for declaration in tool.get("functionDeclarations") or ():
                schema = declaration.get("parametersJsonSchema")
                if "parameters" in declaration:
                    return 400, gemini_error(400, "Unknown name \"parameters\" in this fake")
                if not isinstance(schema, dict) or "$schema" in schema:
                    return 400, gemini_error(400, "Invalid JSON payload: parametersJsonSchema")
                if not cgp.GEMINI_NAME_RE.match(declaration["name"]):
                    return 400, gemini_error(400, "Invalid function name. Must start with a letter or an underscore.")
        generation = body.get("generationConfig") or {}
        if len(generation.get("stopSequences") or ()) > 5:
            return 400, gemini_error(400, "stop_sequences: at most 5")
        thinking = generation.get("thinkingConfig") or {}
        if "thinkingLevel" in thinking and "thinkingBudget" in thinking:
            return 400, gemini_error(400, "You can only set one of thinking budget and thinking level.")
        if generation.get("maxOutputTokens", 1) > 65536:
            return 400, gemini_error(400, "max_output_tokens is too large")
        turn_start = 0
        for i, content in enumerate(contents):
            if not content.get("parts"):
                return 400, gemini_error(400, f"contents[{i}].parts: must not be empty")
            for part in content["parts"]:
                data = part.get("inlineData") or {}
                if data.get("mimeType") == "image/gif":
                    return 400, gemini_error(400, "Unsupported MIME type: image/gif")
            if content["role"] == "user" and any("functionResponse" not in p for p in content["parts"]):
                turn_start = i
            calls = [p for p in content["parts"] if "functionCall" in p]
            if calls:
                following = contents[i + 1]["parts"] if i + 1 < len(contents) else []
                responses = [p for p in following if "functionResponse" in p]
                if i + 1 < len(contents) and len(responses) != len(calls):
                    return 400, gemini_error(400, "Please ensure that the number of function response parts "
                                                  "is equal to the number of function call parts")
        for i, content in enumerate(contents):
            for part in content["parts"]:
                signature = part.get("thoughtSignature")
                if signature and signature != cgp.BYPASS_SIGNATURE and self.issued.get(signature) != model:
                    return 400, gemini_error(400, "Corrupted thought signature.")
            if i < turn_start or content["role"] != "model":
                continue
            first = next((p for p in content["parts"] if "functionCall" in p), None)
            if first is None:
                continue
            if first.get("thoughtSignature") == cgp.BYPASS_SIGNATURE:
                self.bypassed += 1
            elif not first.get("thoughtSignature"):
                return 400, gemini_error(400, "Function call is missing a thought_signature in functionCall "
                                              f"parts. position {i}")
        return None

    def respond(self, handler, body):
        path = handler.path
        problem = self.validate(path, handler.headers, body)
        if problem:
            handler.reply(problem[0], {"error": problem[1]})
            return
        if ":countTokens" in path:
            if self.count_tokens_status != 200:
                handler.reply(self.count_tokens_status, {"error": gemini_error(404, "no", "NOT_FOUND")})
                return
            handler.reply(200, {"totalTokens": len(json.dumps(body)) // 4})
            return
        model = path.split("/models/")[1].split(":")[0]
        with self.lock:
            reply = self.script.pop(0) if self.script else Reply(chunk(text("Hello from Gemini."), finish="STOP"))
        if reply.status != 200:
            handler.reply(reply.status, {"error": reply.error})
            return
        chunks = [self.sign(c, model) for c in reply.chunks]
        if ":streamGenerateContent" in path:
            self.stream(handler, reply, chunks)
        else:
            handler.reply(200, merge_chunks(chunks))

    def sign(self, answer, model):
        answer = json.loads(json.dumps(answer))
        for candidate in answer.get("candidates") or ():
            signed = False
            for part in (candidate.get("content") or {}).get("parts") or ():
                if part.get("thoughtSignature"):
                    self.issued[part["thoughtSignature"]] = model
                    signed = signed or "functionCall" in part
                elif "functionCall" in part and self.sign_calls and not signed:
                    part["thoughtSignature"] = new_signature()
                    self.issued[part["thoughtSignature"]] = model
                    signed = True
        return answer

    def stream(self, handler, reply, chunks):
        handler.send_response(200)
        handler.send_header("content-type", "text/event-stream")
        handler.send_header("transfer-encoding", "chunked")
        handler.end_headers()
        handler.wfile.flush()
        time.sleep(reply.before)
        try:
            for i, answer in enumerate(chunks):
                if i:
                    time.sleep(reply.pause)
                frame = b"data: " + json.dumps(answer).encode() + b"\r\n\r\n"
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(frame), frame))
                handler.wfile.flush()
            if reply.tail:
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(reply.tail), reply.tail))
            if reply.cut:
                handler.wfile.write(b"40\r\npartial")
                handler.wfile.flush()
                handler.close_connection = True
                handler.connection.shutdown(socket.SHUT_RDWR)
                return
            handler.wfile.write(b"0\r\n\r\n")
        except OSError:
            handler.close_connection = True

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def merge_chunks(chunks):
    """Return the non-stream answer for a list of stream chunks, as Gemini does."""
    merged = json.loads(json.dumps(chunks[0])) if chunks else {"candidates": []}
    if not chunks:
        return merged
    parts = []
    for answer in chunks:
        for candidate in answer.get("candidates") or ():
            parts.extend((candidate.get("content") or {}).get("parts") or ())
    last = chunks[-1]
    if merged.get("candidates"):
        merged["candidates"][0]["content"] = {"role": "model", "parts": parts}
        for key in ("finishReason", "groundingMetadata"):
            for answer in chunks:
                for candidate in answer.get("candidates") or ():
                    if key in candidate:
                        merged["candidates"][0][key] = candidate[key]
    if "usageMetadata" in last:
        merged["usageMetadata"] = last["usageMetadata"]
    return merged


# == Fixtures =================================================================

@pytest.fixture
def gemini():
    fake = FakeGemini()
    yield fake
    fake.close()


def make_config(gemini, **overrides):
    values = dict(host="127.0.0.1", port=0, api_keys=("test-key",), api_base=gemini.base,
                  signature_key=b"k" * 32, max_retries=0)
    values.update(overrides)
    return cgp.Config(**values)


class Proxy:
    def __init__(self, config):
        self.server = cgp.build_server(config)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.server.upstream.close()

    def connect(self):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)


@pytest.fixture
def start_proxy():
    started = []

    def start(config):
        proxy = Proxy(config)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
def proxy(gemini, start_proxy):
    return start_proxy(make_config(gemini))


class Answer:
    def __init__(self, response, body):
        self.status = response.status
        self.headers = {k.lower(): v for k, v in response.getheaders()}
        self.raw = body
        try:
            self.json = json.loads(body) if body else None
        except ValueError:
            self.json = None


def request(proxy, method, path, body=None, headers=None, raw=None):
    conn = proxy.connect()
    payload = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=payload, headers=dict({"content-type": "application/json"}, **(headers or {})))
    response = conn.getresponse()
    answer = Answer(response, response.read())
    conn.close()
    return answer


def post(proxy, body, path="/v1/messages", headers=None):
    return request(proxy, "POST", path, body, headers)


def messages_body(content="Hi", **extra):
    return dict({"model": "claude-sonnet-4-5-20250929", "max_tokens": 1024,
                 "messages": [{"role": "user", "content": content}]}, **extra)


def read_sse(raw):
    """Parse an SSE body strictly, as the SDKs do; return (events, rebuilt message)."""
    text_body = raw.decode("utf-8")
    assert text_body.endswith("\n\n"), "stream must end with a blank line"
    events = []
    for frame in text_body.split("\n\n")[:-1]:
        lines = frame.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), frame
        name, data = lines[0][7:], json.loads(lines[1][6:])
        assert data["type"] == name
        events.append(data)
    names = [e["type"] for e in events if e["type"] != "ping"]
    if names and names[-1] == "error":
        return events, None
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"], names
    message = dict(events[0]["message"]) if events[0]["type"] == "message_start" else \
        dict(next(e for e in events if e["type"] == "message_start")["message"])
    message["content"] = []
    open_index, partial = None, ""
    for event in events:
        kind = event["type"]
        if kind == "content_block_start":
            assert open_index is None, "a block opened before the last one closed"
            assert event["index"] == len(message["content"]), "block indexes must count from 0 without gaps"
            message["content"].append(dict(event["content_block"]))
            open_index, partial = event["index"], ""
        elif kind == "content_block_delta":
            assert event["index"] == open_index
            block, delta = message["content"][open_index], event["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif delta["type"] == "signature_delta":
                block["signature"] = delta["signature"]
            elif delta["type"] == "input_json_delta":
                partial += delta["partial_json"]
            else:
                raise AssertionError(f"unknown delta {delta['type']}")
        elif kind == "content_block_stop":
            assert event["index"] == open_index
            block = message["content"][open_index]
            if block["type"] in ("tool_use", "server_tool_use"):
                block["input"] = json.loads(partial) if partial else {}
            open_index = None
        elif kind == "message_delta":
            assert open_index is None
            message.update(event["delta"])
            message["usage"] = dict(message["usage"], **event["usage"])
    return events, message


def stream(proxy, body, headers=None):
    answer = post(proxy, dict(body, stream=True), headers=headers)
    assert answer.status == 200, answer.raw
    assert answer.headers["content-type"] == "text/event-stream"
    return read_sse(answer.raw)


# == Configuration ============================================================

def test_flags_beat_env_and_env_beats_dotenv():
    dotenv = "# comment\nPORT=7000\nHOST='0.0.0.0'\nDEFAULT_GEMINI_MODEL=\"gemini-2.5-pro\"\nGEMINI_API_KEY=file-key\n"
    config = cgp.read_config(["--port", "9000"], {"PORT": "8000", "GEMINI_API_KEY": "env-key"}, dotenv)
    assert config.port == 9000
    assert config.host == "0.0.0.0"
    assert config.default_model == "gemini-2.5-pro"
    assert config.api_keys == ("env-key",)


def test_defaults_and_key_list():
    config = cgp.read_config([], {"GEMINI_API_KEY": "k1, k2,k3"})
    assert (config.host, config.port, config.default_model) == ("127.0.0.1", 8318, "gemini-3.5-flash")
    assert config.api_keys == ("k1", "k2", "k3")
    assert config.max_output_tokens == 60000 and config.stream_mode == "live"
    assert config.api_base == "https://generativelanguage.googleapis.com/v1beta"


def test_missing_key_exits_2_with_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "GEMINI_API_KEY"}
    done = subprocess.run([sys.executable, os.path.join(HERE, "claude_gemini_proxy.py")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "GEMINI_API_KEY" in done.stderr


def test_help_lists_every_option_and_variable():
    done = subprocess.run([sys.executable, os.path.join(HERE, "claude_gemini_proxy.py"), "--help"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    for word in ("--host", "--port", "--env-file", "--debug", "--version", "--stream-mode", "GEMINI_API_KEY",
                 "GEMINI_API_BASE", "GEMINI_AUTH_TYPE", "PROXY_AUTH_TOKEN", "DEFAULT_GEMINI_MODEL",
                 "MAX_OUTPUT_TOKENS", "MODEL_MAP", "DEBUG", "STREAM_MODE", "8318"):
        assert word in done.stdout, word


def test_bad_values_are_refused():
    with pytest.raises(ValueError):
        cgp.read_config([], {"GEMINI_API_KEY": "k", "STREAM_MODE": "sometimes"})
    with pytest.raises(ValueError):
        cgp.read_config([], {"GEMINI_API_KEY": "k", "PORT": "eighty"})
    with pytest.raises(ValueError):
        cgp.read_config([], {"GEMINI_API_KEY": "k", "MODEL_MAP": "claude-*"})


def test_signature_key_is_shared_by_instances_with_the_same_api_key():
    one = cgp.read_config([], {"GEMINI_API_KEY": "k1,k2"})
    two = cgp.read_config([], {"GEMINI_API_KEY": "k1,k3"})
    other = cgp.read_config([], {"GEMINI_API_KEY": "k9"})
    explicit = cgp.read_config([], {"GEMINI_API_KEY": "k9", "PROXY_SIGNATURE_KEY": "s"})
    assert one.signature_key == two.signature_key != other.signature_key
    assert explicit.signature_key != other.signature_key


@pytest.mark.parametrize("client_model,expected", [
    ("Kimi-K2.5", "gemini-default"),
    ("Claude Sonnet 4.6", "gemini-default"),
    ("Claude Opus 4.6", "gemini-default"),
    ("gemini-3.5-flash", "gemini-3.5-flash"),
    ("gemini-3.1-pro-preview", "gemini-3.1-pro-preview"),
    ("claude-haiku-4-5", "gemini-3.5-flash-lite"),
    ("gemini-2.5-pro", "gemini-2.5-pro"),
    ("gemini-2.5-pro[1m]", "gemini-2.5-pro"),
    ("claude-sonnet-4-5-20250929", "gemini-default"),
    ("claude-opus-4-1", "gemini-3.1-pro-preview"),
])
def test_model_routing(client_model, expected):
    config = cgp.Config(default_model="gemini-default", model_map=cgp.parse_model_map(
        "claude-haiku-*=gemini-3.5-flash-lite,claude-opus-*=gemini-3.1-pro-preview,claude-opus-4-1=never"))
    assert cgp.map_model(client_model, config) == expected


@pytest.mark.parametrize("name", ["../secrets", "gemini-x/../../admin", "a?b", "a#b", "a%2F", "models/x"])
def test_unsafe_model_names_are_400(name):
    with pytest.raises(cgp.ProxyError) as caught:
        cgp.map_model(name, cgp.Config())
    assert caught.value.status == 400


def test_startup_line_never_shows_the_key(tmp_path):
    env = dict(os.environ, GEMINI_API_KEY="secret-key-123", PORT="0", GEMINI_API_BASE="http://127.0.0.1:9/v1beta")
    child = subprocess.Popen([sys.executable, os.path.join(HERE, "claude_gemini_proxy.py"), "--debug"],
                             cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stderr.readline()
    finally:
        child.terminate()
        child.wait(timeout=10)
    assert "listening on http://127.0.0.1:" in line and "127.0.0.1:9/v1beta" in line
    assert "gemini-3.5-flash" in line and "secret-key-123" not in line
    assert child.returncode == 0
