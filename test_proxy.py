"""Tests for claude_gemini_proxy: the real proxy in-process against a fake Gemini.

Run: python3 -m pip install pytest && python3 -m pytest -q
"""
from __future__ import annotations

import base64
import errno
import gc
import hashlib
import http.client
import itertools
import json
import os
import random
import re
import secrets
import select
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

    def __init__(self, *chunks, status=200, error=None, pause=0.0, tail=b"", cut=False, before=0.0,
                 hold_after=None, verbatim=False, close_delimited=False):
        self.chunks = list(chunks)
        self.close_delimited = close_delimited  # stream with Connection: close, no chunks
        self.verbatim = verbatim  # send the chunks unsigned and unmerged
        self.hold_after = hold_after  # stream this many chunks, then wait for FakeGemini.hold
        self.status = status
        self.error = error  # Gemini error object for a non-200 status
        self.pause = pause  # seconds between streamed chunks
        self.before = before  # seconds before the first chunk
        self.tail = tail  # raw bytes sent after the chunks
        self.cut = cut  # end the stream without the terminating chunk


def chunk(*parts, finish=None, usage=None, grounding=None, url_context=None, model="gemini-3.5-flash"):
    """Return one GenerateContentResponse holding `parts`."""
    candidate = {"content": {"role": "model", "parts": list(parts)}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    if grounding:
        candidate["groundingMetadata"] = grounding
    if url_context:
        candidate["urlContextMetadata"] = {"urlMetadata": url_context}
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


def MISSING_FILE(name):
    return gemini_error(403, f"You do not have permission to access the File {name[6:]} or it may not exist.",
                        "PERMISSION_DENIED")


def new_signature():
    return base64.b64encode(secrets.token_bytes(48)).decode()


# What real Gemini accepts in `parameters` (a proto Schema): any other key fails the request.
GEMINI_SCHEMA_KEYS = {"type", "format", "title", "description", "nullable", "enum", "items", "minItems",
                      "maxItems", "properties", "required", "minProperties", "maxProperties", "minimum",
                      "maximum", "minLength", "maxLength", "pattern", "example", "anyOf", "propertyOrdering",
                      "default"}


def schema_problem(schema, path):
    """Return Gemini's complaint about a `parameters` Schema, or None when it accepts it."""
    if not isinstance(schema, dict):
        return f"{path}: Proto field is not a message"
    for key in schema:
        if key not in GEMINI_SCHEMA_KEYS:
            return f"Invalid JSON payload received. Unknown name \"{key}\" at '{path}': Cannot find field."
    if "anyOf" in schema:
        if len(schema) > 1:
            return f"{path}: schema specified other fields alongside any_of"
        return next(filter(None, (schema_problem(b, f"{path}.any_of[{i}]") for i, b in enumerate(schema["anyOf"]))),
                    None)
    kind = schema.get("type")
    if isinstance(kind, list):
        return f"{path}.type: Proto field is not repeating, cannot start list."
    if kind not in ("string", "number", "integer", "boolean", "array", "object"):
        return f"{path}.type: must be specified"
    if "enum" in schema and (kind != "string" or not all(isinstance(v, str) for v in schema["enum"])):
        return f"{path}.enum: only allowed for STRING type"
    if "items" in schema and kind != "array":
        return f"{path}.items: field predicate failed: $type == Type.ARRAY"
    if kind == "array":
        return schema_problem(schema["items"], f"{path}.items") if "items" in schema else f"{path}.items: missing field"
    if kind == "object":
        properties = schema.get("properties") or {}
        if not properties:
            return f"{path}.properties: should be non-empty for OBJECT type"
        if any(name not in properties for name in schema.get("required") or ()):
            return f"{path}.required: property is not defined"
        return next(filter(None, (schema_problem(sub, f"{path}.properties[{name}]")
                                  for name, sub in properties.items())), None)
    return None


class FakeGemini:
    """A ThreadingHTTPServer that answers like Gemini v1beta from a script."""

    def __init__(self):
        self.requests = []  # (method, path, headers, body)
        self.raw_bodies = []  # each POST body's bytes as received
        self.script = []  # Reply objects, used in order; empty: a default text answer
        self.issued = {}  # signature -> model that issued it
        self.sign_calls = True  # sign the first functionCall of each answer, as Gemini 3 does
        self.bypassed = 0
        self.connections = 0
        self.models = [
            {"name": "models/gemini-3.5-flash", "displayName": "Gemini 3.5 Flash", "inputTokenLimit": 1048576,
             "outputTokenLimit": 65536, "supportedGenerationMethods": ["generateContent", "countTokens"],
             "thinking": True},
            {"name": "models/gemini-3.1-pro-preview", "displayName": "Gemini 3.1 Pro",
             "inputTokenLimit": 1048576, "outputTokenLimit": 65536,
             "supportedGenerationMethods": ["generateContent", "batchGenerateContent"], "thinking": True},
            {"name": "models/embedding-001", "supportedGenerationMethods": ["embedContent"]},
            {"name": "models/gemini-2.5-flash", "displayName": "Gemini 2.5 Flash", "inputTokenLimit": 1048576,
             "outputTokenLimit": 65536, "supportedGenerationMethods": ["generateContent"], "thinking": True},
            {"name": "models/gemma-3-27b-it", "displayName": "Gemma 3 27B", "inputTokenLimit": 131072,
             "outputTokenLimit": 8192, "supportedGenerationMethods": ["generateContent"]},
        ]
        self.count_tokens_status = 200
        self.uncombinable = set()  # Gemini 3 models that still refuse built-in + function tools
        self.hold = threading.Event()  # released by a test once the client has its answer
        self.retired = set()  # models answering 404, as retired ids do
        self.served_as = {}  # model asked for -> modelVersion Gemini reports
        self.bad_keys = set()  # keys Gemini calls invalid
        self.model_list = True  # False: GET /models is a 404, as at a Vertex base
        self.batches = {}  # name -> batch record (Batch API)
        self.files = {}  # name -> Gemini File (Files API)
        self.file_bytes = {}  # name -> content
        self.uploads = {}  # upload id -> {"file", "data", "size"}
        self.inline_limit = 20 * 1000 * 1000  # Gemini's inline batch request limit
        self.upload_answer = None  # bytes to answer an upload's final chunk with instead
        self.cancel_async = False  # real Gemini cancels in the background
        self.refused_batch_models = set()  # models whose batchGenerateContent answers 429
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with fake.lock:
                    fake.connections += 1

            def do_GET(self):
                fake.record(self, None)
                problem = fake.auth_problem(self.headers)
                if problem:
                    self.reply(problem[0], {"error": problem[1]})
                elif ":download" in self.path:
                    self.reply(*fake.download(self.path))
                else:
                    self.reply(*fake.answer_get(self.path))

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.path.startswith("/upload/"):
                    fake.record(self, raw)
                    self.reply(*fake.upload(self.path, self.headers, raw))
                    return
                body = json.loads(raw)
                fake.record(self, body, raw)
                if self.path.startswith("/v1beta/batches/") or ":batchGenerateContent" in self.path:
                    self.reply(*fake.batch_post(self.path, self.headers, body, len(raw)))
                    return
                fake.respond(self, body)

            def do_DELETE(self):
                fake.record(self, None)
                problem = fake.auth_problem(self.headers)
                self.reply(*(problem[0], {"error": problem[1]}) if problem else fake.delete(self.path))

            def reply(self, status, payload, headers=None):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}/v1beta"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def record(self, handler, body, raw=b""):
        with self.lock:
            self.requests.append((handler.command, handler.path, dict(handler.headers), body))
            if raw:
                self.raw_bodies.append(raw)

    @property
    def bodies(self):
        return [r[3] for r in self.requests if r[0] == "POST"]

    def answer_get(self, path):
        if path.startswith("/v1beta/models?") and not self.model_list:  # Vertex: no list there
            return 404, {"error": gemini_error(404, "The requested URL was not found.", "NOT_FOUND")}
        if path.startswith("/v1beta/models?"):
            if "pageToken=p2" in path:
                return 200, {"models": self.models[2:]}
            return 200, {"models": self.models[:2], "nextPageToken": "p2"}
        route, _, query = path.partition("?")
        if route == "/v1beta/batches":
            return 200, self.page(query, [self.operation(b) for b in self.batches.values()],
                                  "operations")
        if route == "/v1beta/files":
            return 200, self.page(query, list(self.files.values()), "files")
        name = route[len("/v1beta/"):]
        if name in self.batches:
            return 200, self.operation(self.batches[name])
        if name in self.files:
            return 200, self.files[name]
        if name.startswith("files/"):
            return 403, {"error": MISSING_FILE(name)}
        return 404, {"error": gemini_error(404, "not found", "NOT_FOUND")}

    @staticmethod
    def page(query, items, field):
        params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
        size, start = min(int(params.get("pageSize", "10")), 100), int(params.get("pageToken", "0"))
        answer = {field: items[start:start + size]}
        if start + size < len(items):
            answer["nextPageToken"] = str(start + size)
        return answer

    # -- Batch API: batchGenerateContent, batches.get/list/cancel/delete ----------

    def batch_post(self, path, headers, body, size):
        problem = self.auth_problem(headers)
        if problem:
            return problem[0], {"error": problem[1]}
        if path.endswith(":cancel"):
            record = self.batches.get(path[len("/v1beta/"):-len(":cancel")])
            if record is None:
                return 404, {"error": gemini_error(404, "batch not found", "NOT_FOUND")}
            if record["state"] in ("BATCH_STATE_PENDING", "BATCH_STATE_RUNNING") and not self.cancel_async:
                self.end_batch(record["name"], "BATCH_STATE_CANCELLED", answered=0)
            return 200, {}
        if size > self.inline_limit:
            return 400, {"error": gemini_error(400, "Request payload size exceeds the limit: 20971520 bytes.")}
        model = path.split("/models/")[1].split(":")[0]
        if model in self.refused_batch_models:
            return 429, {"error": gemini_error(429, "Batch quota exceeded", "RESOURCE_EXHAUSTED")}
        batch = body.get("batch") or {}
        if not batch.get("displayName"):
            return 400, {"error": gemini_error(400, "batch.display_name: required")}
        source = batch.get("inputConfig") or {}
        if len(source) != 1 or not ({"requests", "fileName"} >= set(source)):
            return 400, {"error": gemini_error(400, "batch.input_config: set exactly one source")}
        if "fileName" in source:
            if source["fileName"] not in self.files:
                return 400, {"error": gemini_error(400, "batch.input_config.file_name: not found")}
            items = [json.loads(line) for line in self.file_bytes[source["fileName"]].splitlines()]
            items = [{"request": item["request"], "metadata": {"key": item["key"]}} for item in items]
        else:
            items = (source.get("requests") or {}).get("requests") or []
        if not items:
            return 400, {"error": gemini_error(400, "batch.input_config.requests: empty")}
        for i, item in enumerate(items):
            problem = self.validate(f"/v1beta/models/{model}:generateContent", headers, item.get("request") or {})
            if problem:
                return 400, {"error": gemini_error(400, f"requests[{i}]: {problem[1]['message']}")}
        now = time.strftime("%Y-%m-%dT%H:%M:%S.123456789Z", time.gmtime(time.time() + len(self.batches)))
        name = "batches/" + secrets.token_hex(8)
        self.batches[name] = {"name": name, "model": f"models/{model}", "displayName": batch["displayName"],
                              "state": "BATCH_STATE_PENDING", "createTime": now, "updateTime": now,
                              "inputConfig": source, "items": items, "answers": [], "output": None}
        return 200, self.operation(self.batches[name])

    def operation(self, record):
        """Return the long-running Operation Gemini answers for a batch."""
        answers = record["answers"]
        stats = {"requestCount": str(len(record["items"])),
                 "successfulRequestCount": str(sum("response" in a for a in answers)),
                 "failedRequestCount": str(sum("error" in a for a in answers))}
        stats["pendingRequestCount"] = str(len(record["items"]) - len(answers))
        meta = {"@type": "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatch",
                "model": record["model"], "displayName": record["displayName"],
                "inputConfig": record["inputConfig"], "createTime": record["createTime"],
                "updateTime": record["updateTime"], "batchStats": stats, "state": record["state"]}
        done = record["state"] not in ("BATCH_STATE_PENDING", "BATCH_STATE_RUNNING")
        operation = {"name": record["name"], "metadata": meta, "done": done}
        if done:
            meta["endTime"] = record["updateTime"]
        if record["output"]:
            meta["output"] = record["output"]
            operation["response"] = dict(record["output"], **{
                "@type": "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatchOutput"})
        if record["state"] == "BATCH_STATE_FAILED":
            operation["error"] = {"code": 13, "message": "The batch failed: internal error."}
        return operation

    def end_batch(self, name, state="BATCH_STATE_SUCCEEDED", answered=None, errors=(), reverse=False):
        """End a batch as Gemini would: answer the first `answered` requests from the script."""
        record = self.batches[name]
        count = len(record["items"]) if answered is None else answered
        answers = []
        for i, item in enumerate(record["items"][:count]):
            key = item["metadata"]["key"]
            if i in errors:
                answers.append({"key": key, "error": gemini_error(400, f"request {i} was invalid")})
                continue
            with self.lock:
                reply = self.script.pop(0) if self.script else Reply(chunk(text(f"Answer {i}."), finish="STOP"))
            answers.append({"key": key, "response": merge_chunks([self.sign(c, record["model"][7:]) for c in reply.chunks])})
        record["answers"] = answers
        ordered = list(reversed(answers)) if reverse else answers
        if "fileName" in record["inputConfig"]:
            name_out = self.add_file(b"".join(json.dumps(a).encode() + b"\n" for a in ordered),
                                     "application/jsonl", "batch-output", source="GENERATED")
            record["output"] = {"responsesFile": name_out} if answers else None
        elif answers:
            record["output"] = {"inlinedResponses": {"inlinedResponses": [
                {"metadata": {"key": a["key"]}, **{k: v for k, v in a.items() if k != "key"}} for a in ordered]}}
        record["state"] = state
        record["updateTime"] = time.strftime("%Y-%m-%dT%H:%M:%S.5Z", time.gmtime(time.time() + 60))

    def delete(self, path):
        name = path[len("/v1beta/"):]
        if self.batches.pop(name, None) is not None:
            return 200, {}
        if self.files.pop(name, None) is not None:
            return 200, {}
        if name.startswith("files/"):
            return 403, {"error": MISSING_FILE(name)}
        return 404, {"error": gemini_error(404, "not found", "NOT_FOUND")}

    # -- Files API: resumable upload, files.get/list/delete, download ---------------

    def add_file(self, data, mime_type, display_name, source="UPLOADED"):
        name = "files/" + secrets.token_hex(6)
        now = time.time()
        self.files[name] = {
            "name": name, "displayName": display_name, "mimeType": mime_type, "sizeBytes": str(len(data)),
            "createTime": time.strftime("%Y-%m-%dT%H:%M:%S.1Z", time.gmtime(now)),
            "updateTime": time.strftime("%Y-%m-%dT%H:%M:%S.1Z", time.gmtime(now)),
            "expirationTime": time.strftime("%Y-%m-%dT%H:%M:%S.1Z", time.gmtime(now + 48 * 3600)),
            "sha256Hash": base64.b64encode(hashlib.sha256(data).digest()).decode(),
            "uri": f"{self.base}/{name}", "state": "ACTIVE", "source": source}
        self.file_bytes[name] = data
        return name

    def upload(self, path, headers, raw):
        problem = self.auth_problem(headers)
        if problem:
            return problem[0], {"error": problem[1]}
        lower = {k.lower(): v for k, v in headers.items()}
        command = lower.get("x-goog-upload-command", "")
        if path == "/upload/v1beta/files":
            if lower.get("x-goog-upload-protocol") != "resumable" or command != "start":
                return 400, {"error": gemini_error(400, "Upload protocol must be resumable, command start")}
            if not lower.get("x-goog-upload-header-content-type"):
                return 400, {"error": gemini_error(400, "Missing X-Goog-Upload-Header-Content-Type")}
            upload_id = secrets.token_hex(8)
            display = (json.loads(raw or b"{}").get("file") or {}).get("displayName", "")
            declared = lower.get("x-goog-upload-header-content-length")
            self.uploads[upload_id] = {"display": display, "data": b"", "chunks": [],
                                       "mime": lower["x-goog-upload-header-content-type"],
                                       "declared": int(declared) if declared else None}
            url = (f"http://127.0.0.1:{self.server.server_address[1]}/upload/v1beta/files"
                   f"?upload_id={upload_id}&upload_protocol=resumable")
            return 200, b"", {"X-Goog-Upload-URL": url, "X-Goog-Upload-Status": "active"}
        upload = self.uploads.get(path.partition("upload_id=")[2].partition("&")[0])
        if upload is None:
            return 404, {"error": gemini_error(404, "no such upload", "NOT_FOUND")}
        if int(lower.get("x-goog-upload-offset", "-1")) != len(upload["data"]):
            return 400, {"error": gemini_error(400, "X-Goog-Upload-Offset does not match")}
        if command not in ("upload", "upload, finalize"):
            return 400, {"error": gemini_error(400, f"bad upload command {command!r}")}
        if command == "upload" and len(raw) % (256 * 1024):
            return 400, {"error": gemini_error(400, "chunks must be multiples of 256 KiB")}
        upload["data"] += raw
        upload["chunks"].append(len(raw))
        if command == "upload":
            return 200, b"", {"X-Goog-Upload-Status": "active"}
        if upload["declared"] is not None and upload["declared"] != len(upload["data"]):
            return 400, {"error": gemini_error(400, "size differs from X-Goog-Upload-Header-Content-Length")}
        name = self.add_file(upload["data"], upload["mime"], upload["display"])
        upload["file"] = name
        if self.upload_answer is not None:
            return 200, self.upload_answer, {"X-Goog-Upload-Status": "final"}
        return 200, {"file": self.files[name]}, {"X-Goog-Upload-Status": "final"}

    def download(self, path):
        name = path[len("/v1beta/"):].split(":download")[0]
        if name not in self.files:
            return 403, {"error": MISSING_FILE(name)}
        if self.files[name]["source"] != "GENERATED" or "alt=media" not in path:
            return 400, {"error": gemini_error(400, "Only generated files can be downloaded.")}
        return 200, self.file_bytes[name]

    def auth_problem(self, headers):
        lower = {k.lower(): v for k, v in headers.items()}
        if not lower.get("x-goog-api-key") and not lower.get("authorization"):
            return 401, gemini_error(401, "Method doesn't allow unregistered callers.", "UNAUTHENTICATED")
        if lower.get("x-goog-api-key") and lower.get("authorization"):
            return 401, gemini_error(401, "Request had invalid authentication credentials.", "UNAUTHENTICATED")
        if lower.get("x-goog-api-key") in self.bad_keys:
            details = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}]
            return 400, gemini_error(400, "API key not valid. Please pass a valid API key.", details=details)
        return None

    def validate(self, path, headers, body):
        """Return the (status, error) real Gemini gives this request, or None when it is fine."""
        problem = self.auth_problem(headers)
        if problem:
            return problem
        model = path.split("/models/")[1].split(":")[0]
        if model in self.retired:
            return 404, gemini_error(404, f"models/{model} is not found for API version v1beta, or is not "
                                          "supported for generateContent. Call ListModels to see the list of "
                                          "available models and their supported methods.", "NOT_FOUND")
        if ":countTokens" in path:
            body = body.get("generateContentRequest") or body
            if "model" not in body:
                return 400, gemini_error(400, "generate_content_request.model: model is not specified")
        model = path.split("/models/")[1].split(":")[0]
        contents = body.get("contents") or []
        if not contents:
            return 400, gemini_error(400, "contents is not specified")
        for t, tool in enumerate(body.get("tools") or ()):
            for d, declaration in enumerate(tool.get("functionDeclarations") or ()):
                schema = declaration.get("parametersJsonSchema")
                if "parameters" in declaration:
                    where = f"GenerateContentRequest.tools[{t}].function_declarations[{d}].parameters"
                    problem = schema_problem(declaration["parameters"], where)
                    if problem or "parametersJsonSchema" in declaration:
                        return 400, gemini_error(400, problem or "parameters and parametersJsonSchema both set")
                    continue
                if not isinstance(schema, dict) or "$schema" in schema:
                    return 400, gemini_error(400, "Invalid JSON payload: parametersJsonSchema")
                if not cgp.GEMINI_NAME_RE.match(declaration["name"]):
                    return 400, gemini_error(400, "Invalid function name. Must start with a letter or an underscore.")
        builtins = [t for t in body.get("tools") or () if set(t) & {"googleSearch", "urlContext", "codeExecution"}]
        if builtins and any("functionDeclarations" in t for t in body.get("tools") or ()):
            combined = (body.get("toolConfig") or {}).get("includeServerSideToolInvocations") is True
            if cgp._model_version(model) < (3, 0) or not combined or model in self.uncombinable:
                return 400, gemini_error(400, "Tool use with function calling is unsupported")
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
                uri = (part.get("fileData") or {}).get("fileUri", "")
                if uri.startswith(self.base + "/files/"):
                    known = self.files.get(uri[len(self.base) + 1:])
                    if known is None or known["mimeType"] != part["fileData"].get("mimeType"):
                        return 403, MISSING_FILE(uri[len(self.base) + 1:])
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
        if reply.verbatim:  # odd shapes go out exactly as scripted: the last one when not streaming
            chunks = reply.chunks
        else:
            chunks = [dict(self.sign(c, model), modelVersion=self.served_as.get(model, model))
                      for c in reply.chunks]
        if ":streamGenerateContent" in path:
            self.stream(handler, reply, chunks)
        else:
            time.sleep(reply.before)
            handler.reply(200, chunks[-1] if reply.verbatim else merge_chunks(chunks))

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
        if reply.close_delimited:  # as gateways that close after each answer send it
            self.stream_until_close(handler, chunks)
            return
        handler.send_response(200)
        handler.send_header("content-type", "text/event-stream")
        handler.send_header("transfer-encoding", "chunked")
        handler.end_headers()
        handler.wfile.flush()
        time.sleep(reply.before)
        try:
            for i, answer in enumerate(chunks):
                if i and i == reply.hold_after:
                    self.hold.wait(10)
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

    def stream_until_close(self, handler, chunks):
        handler.send_response(200)
        handler.send_header("content-type", "text/event-stream")
        handler.send_header("connection", "close")
        handler.end_headers()
        for answer in chunks:
            handler.wfile.write(b"data: " + json.dumps(answer).encode() + b"\r\n\r\n")
        handler.wfile.flush()
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
        for key in ("finishReason", "groundingMetadata", "urlContextMetadata"):
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


class Clock:
    """A monotonic clock that tests move by hand; sleep() records the wait and advances it."""

    def __init__(self):
        self.time = 1000.0
        self.slept = []

    def now(self):
        return self.time

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.time += seconds


class Proxy:
    def __init__(self, config, clock=None):
        clock_args = {"sleep": clock.sleep, "now": clock.now} if clock else {}
        self.server = cgp.build_server(config, **clock_args)
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

    def start(config, clock=None):
        proxy = Proxy(config, clock)
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
            elif delta["type"] == "citations_delta":
                assert block["type"] == "text"
                block.setdefault("citations", []).append(delta["citation"])
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


def nested(depth):
    value = "x"
    for _ in range(depth):
        value = [value]
    return value


# == Captured Claude Code requests ============================================
# Requests below are trimmed captures of what Claude Code 2.1.331 sent through this proxy.

CC_SYSTEM = [
    {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.331.628; cc_entrypoint=sdk-cli;"},
    {"type": "text", "text": "You are a Claude agent, built on Anthropic's Claude Agent SDK.",
     "cache_control": {"type": "ephemeral"}},
    {"type": "text", "text": "\nYou are an agent working with the user toward their goals, using your own judgment "
                             "along the way.\n", "cache_control": {"type": "ephemeral"}}]
CC_TOOLS = [
    {"name": "Bash", "description": "Executes a bash command and returns its output.", "input_schema": {
        "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "properties": {
            "command": {"description": "The command to execute", "type": "string"},
            "timeout": {"description": "Optional timeout in milliseconds", "type": "number"}},
        "required": ["command"], "additionalProperties": False}},
    {"name": "ToolSearch", "description": "Fetches full schema definitions for deferred tools.", "input_schema": {
        "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "properties": {
            "query": {"description": "Use \"select:<tool_name>\" for direct selection", "type": "string"},
            "max_results": {"description": "Maximum number of results", "default": 5, "type": "number"}},
        "required": ["query", "max_results"], "additionalProperties": False}},
    {"name": "DeferredToolPlaceholder", "description": "placeholder", "defer_loading": True,
     "input_schema": {"type": "object", "properties": {}}},
]
CC_WEBFETCH = {"name": "WebFetch", "defer_loading": True, "description": "Fetches a URL.", "input_schema": {
    "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "properties": {
        "url": {"description": "The URL to fetch content from", "type": "string", "format": "uri"},
        "prompt": {"description": "The prompt to run on the fetched content", "type": "string"},
        "offset": {"type": "integer", "minimum": 0, "maximum": 9007199254740991}},
    "required": ["url", "prompt"], "additionalProperties": False}}
CC_HEADERS = {"anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27,"
                                "advanced-tool-use-2025-11-20,effort-2025-11-24", "anthropic-version": "2023-06-01",
              "x-api-key": "sk-test", "user-agent": "claude-cli/2.1.331 (external, sdk-cli)", "x-app": "cli"}
CC_PATH = "/v1/messages?beta=true"


def claude_code_request(messages, tools=None, billing="628"):
    system = [dict(CC_SYSTEM[0], text=f"x-anthropic-billing-header: cc_version=2.1.331.{billing}; "
                                         "cc_entrypoint=sdk-cli;")] + CC_SYSTEM[1:]
    return {"model": "gemini-3.5-flash", "max_tokens": 32000, "stream": True, "system": system,
            "tools": tools or CC_TOOLS, "messages": messages,
            "thinking": {"type": "adaptive", "display": "omitted"}, "output_config": {"effort": "high"},
            "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
            "metadata": {"user_id": "{\"device_id\":\"8665b3\",\"account_uuid\":\"\",\"session_id\":\"698fda1f\"}"}}


CC_FIRST_MESSAGES = [
    {"role": "user", "content": [
        {"type": "text", "text": "<system-reminder>\nAttribution for git commits...\n</system-reminder>"},
        {"type": "text", "text": "please use toolsearch to load WebFetch, then fetch https://example.com",
         "cache_control": {"type": "ephemeral"}}]},
    {"role": "system", "content": [{"type": "text", "text": "# Environment\nYou have been invoked in the following "
                                                            "environment: \n - Platform: linux",
                                    "cache_control": {"type": "ephemeral"}}]}]


def cc_stream(proxy, body):
    answer = post(proxy, body, path=CC_PATH, headers=CC_HEADERS)
    assert answer.status == 200, answer.raw
    return read_sse(answer.raw)


def declared(body):
    return [d["name"] for t in body.get("tools") or () for d in t.get("functionDeclarations") or ()]


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
    for word in ("--host", "--port", "--env-file", "--debug", "--version", "--stream-mode", "8318", "--check"):
        assert word in done.stdout, word
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as readme:
        table = [line for line in readme if line.startswith("| `")]
    names = [option[0] for option in cgp.ENV_OPTIONS] + [name for name, _ in cgp.OTHER_ENV]
    for name in names:  # every variable the proxy reads is documented in all three places
        assert name in cgp.__doc__, name
        assert name in done.stdout, name
        assert any(f"`{name}`" in line for line in table), name


def test_bad_values_are_refused():
    with pytest.raises(ValueError):
        cgp.read_config([], {"GEMINI_API_KEY": "k", "STREAM_MODE": "sometimes"})
    with pytest.raises(ValueError):
        cgp.read_config([], {"GEMINI_API_KEY": "k", "PORT": "eighty"})
    with pytest.raises(ValueError):
        cgp.read_config([], {"GEMINI_API_KEY": "k", "MODEL_MAP": "claude-*"})


def test_model_fallbacks_and_tool_schema_repair_are_read():
    config = cgp.read_config([], {"GEMINI_API_KEY": "k", "TOOL_SCHEMA_REPAIR": "off", "MODEL_FALLBACKS":
                                  "gemini-3.1-pro-preview=gemini-3.5-flash, gemini-3.5-flash=gemini-3.5-flash-lite"})
    assert config.model_fallbacks == (("gemini-3.1-pro-preview", "gemini-3.5-flash"),
                                      ("gemini-3.5-flash", "gemini-3.5-flash-lite"))
    assert config.tool_schema_repair is False
    defaults = cgp.read_config([], {"GEMINI_API_KEY": "k"})
    assert defaults.model_fallbacks == () and defaults.tool_schema_repair is True
    for bad in ("gemini-3.5-flash", "a=b,a=c", "a=a", "a=../b"):
        with pytest.raises(ValueError, match="MODEL_FALLBACKS"):
            cgp.read_config([], {"GEMINI_API_KEY": "k", "MODEL_FALLBACKS": bad})
    with pytest.raises(ValueError, match="TOOL_SCHEMA_REPAIR"):
        cgp.read_config([], {"GEMINI_API_KEY": "k", "TOOL_SCHEMA_REPAIR": "maybe"})


def test_signature_key_is_shared_by_instances_with_the_same_api_key():
    one = cgp.read_config([], {"GEMINI_API_KEY": "k1,k2"})
    two = cgp.read_config([], {"GEMINI_API_KEY": "k1,k3"})
    other = cgp.read_config([], {"GEMINI_API_KEY": "k9"})
    explicit = cgp.read_config([], {"GEMINI_API_KEY": "k9", "PROXY_SIGNATURE_KEY": "s"})
    assert one.signature_key == two.signature_key != other.signature_key
    assert explicit.signature_key != other.signature_key


@pytest.mark.parametrize("host,no_proxy,bypass", [
    ("generativelanguage.googleapis.com", "", False),
    ("generativelanguage.googleapis.com", "*", True),
    ("generativelanguage.googleapis.com", ".googleapis.com", True),
    ("generativelanguage.googleapis.com", "googleapis.com,localhost", True),
    ("generativelanguage.googleapis.com", "notgoogleapis.com", False),
    ("127.0.0.1", "localhost, 127.0.0.1:8080", True),
])
def test_no_proxy_rules(host, no_proxy, bypass):
    assert cgp._bypasses_proxy(host, no_proxy) is bypass


def test_config_is_read_only_and_hides_secrets_in_repr():
    config = cgp.Config(api_keys=("AIzaSecret",), proxy_auth_token="t0ken-s3cret", port=1)
    with pytest.raises(AttributeError):
        config.port = 2
    with pytest.raises(TypeError):
        cgp.Config(no_such_setting=1)
    assert "AIzaSecret" not in repr(config) and "t0ken" not in repr(config) and "port=1" in repr(config)
    shown = repr(cgp.Config(https_proxy="http://alice:s3cret@egress:3128", auth_command="print-tok",
                            api_base="https://bob:pw2@gw.example/v1beta", signature_key=b"sigkey"))
    for secret in ("alice", "s3cret", "bob", "pw2", "print-tok", "sigkey"):
        assert secret not in shown, secret
    assert "http://egress:3128" in shown and "stream_mode='live'" in shown  # defaults shown too


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
    config = cgp.Config(default_model="gemini-default", model_map=cgp._parse_model_map(
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
    port = line.split("listening on http://127.0.0.1:")[1].split(",")[0]
    assert line.rstrip().endswith(f"Claude Code: ANTHROPIC_BASE_URL=http://127.0.0.1:{port} "
                                  "ANTHROPIC_AUTH_TOKEN=anything claude")
    assert child.returncode == 0


# == Errors ===================================================================

@pytest.mark.parametrize("status,client_status,error_type,should_retry", [
    (400, 400, "invalid_request_error", "false"), (401, 403, "permission_error", "false"),
    (403, 403, "permission_error", "false"), (404, 404, "not_found_error", "false"),
    (408, 504, "timeout_error", None), (413, 413, "request_too_large", "false"),
    (429, 429, "rate_limit_error", None), (500, 500, "api_error", None),
    (502, 502, "api_error", None), (503, 529, "overloaded_error", None),
    (504, 504, "timeout_error", None),
])
def test_upstream_statuses_map_to_anthropic_errors(gemini, proxy, status, client_status,
                                                   error_type, should_retry):
    gemini.script = [Reply(status=status, error=gemini_error(status, "upstream says no"))]
    answer = post(proxy, messages_body())
    assert answer.status == client_status
    assert answer.json["type"] == "error" and answer.json["error"]["type"] == error_type
    assert "upstream says no" in answer.json["error"]["message"]
    assert answer.headers.get("x-should-retry") == should_retry
    if client_status in (429, 529):
        assert int(answer.headers["retry-after"]) > 0
    assert len(gemini.bodies) == 1  # max_retries=0: one call, whatever the status
    assert post(proxy, messages_body()).status == 200  # the next request is served as before
    assert len(gemini.bodies) == 2


def test_rate_limit_retry_after_comes_from_gemini_retry_delay(gemini, proxy):
    details = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "37s"}]
    gemini.script = [Reply(status=429, error=gemini_error(429, "quota", "RESOURCE_EXHAUSTED", details))]
    answer = post(proxy, messages_body())
    assert answer.status == 429 and answer.headers["retry-after"] == "37"


def test_bad_key_is_reported_as_gemini_rejecting_the_key(gemini, proxy):
    details = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}]
    gemini.script = [Reply(status=400, error=gemini_error(400, "API key not valid.", details=details))]
    answer = post(proxy, messages_body())
    assert answer.status == 403 and answer.json["error"]["type"] == "permission_error"
    assert "Gemini rejected" in answer.json["error"]["message"]
    assert answer.headers["x-should-retry"] == "false"


def test_context_overflow_becomes_prompt_is_too_long(gemini, proxy):
    message = "The input token count (1200293) exceeds the maximum number of tokens allowed (1048576)."
    gemini.script = [Reply(status=400, error=gemini_error(400, message))]
    answer = post(proxy, messages_body())
    assert answer.status == 400 and answer.json["error"]["type"] == "invalid_request_error"
    assert answer.json["error"]["message"] == "prompt is too long: 1200293 tokens > 1048576 maximum"
    assert answer.headers["x-should-retry"] == "false"


def test_unreachable_upstream_is_502_and_timeout_is_504(gemini, start_proxy):
    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        dead_port = spare.getsockname()[1]
    dead = start_proxy(make_config(gemini, api_base=f"http://127.0.0.1:{dead_port}/v1beta"))
    answer = post(dead, messages_body())
    assert answer.status == 502 and answer.json["error"]["type"] == "api_error"
    slow = start_proxy(make_config(gemini, upstream_timeout=0.3))
    gemini.script = [Reply(chunk(text("late"), finish="STOP"), before=1.0)]
    answer = post(slow, messages_body())
    assert answer.status == 504 and answer.json["error"]["type"] == "timeout_error"
    gemini.script = [Reply(chunk(text("late"), finish="STOP"), before=1.0)]
    events, _ = read_sse(post(slow, dict(messages_body(), stream=True)).raw)
    assert [e["type"] for e in events] == ["message_start", "error"]
    assert events[-1]["error"]["type"] == "timeout_error"


def test_unreadable_upstream_json_is_502(gemini, proxy):
    gemini.script = [Reply(chunk(text("x")), tail=b"{not json")]
    answer = post(proxy, dict(messages_body(), stream=True))
    events, _ = read_sse(answer.raw)
    assert events[-1]["type"] == "error" and events[-1]["error"]["type"] == "api_error"


def test_no_candidates_is_502_after_one_retry(gemini, proxy):
    gemini.script = [Reply({"usageMetadata": {"promptTokenCount": 3}}), Reply({"usageMetadata": {}})]
    answer = post(proxy, messages_body())
    assert answer.status == 502 and answer.json["error"]["type"] == "api_error"
    assert len(gemini.bodies) == 2


@pytest.mark.parametrize("delay,expected", [
    ("infs", cgp.MAX_KEY_REST), ("1e308s", cgp.MAX_KEY_REST), ("nans", None), ("-5s", 0.0),
    ("garbage", None), ("12.5s", 12.5), (17, None),
])
def test_retry_delays_are_clamped_or_ignored(delay, expected):
    details = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}]
    error = cgp._upstream_error(429, json.dumps({"error": gemini_error(429, "slow", "RESOURCE_EXHAUSTED",
                                                                      details)}).encode())
    assert error.retry_delay == expected
    assert 1 <= int(error.headers["retry-after"]) <= 3600


@pytest.mark.parametrize("payload", [
    json.dumps({"error": {"code": 429, "message": "slow", "details": {"retryDelay": "5s"}}}).encode(),
    json.dumps({"error": {"code": 429, "message": "slow", "details": 7}}).encode(),
    json.dumps({"error": "quota exhausted"}).encode(),
    b'{"error": {"message": ' + b"[" * 100000 + b"]" * 100000 + b"}}",
    json.dumps({"error": {"code": 429, "message": "x" * (50 << 20)}}).encode(),
    b"<html>" + b"y" * (50 << 20),
], ids=["details-object", "details-number", "error-string", "deep", "50MB-json", "50MB-html"])
def test_odd_error_bodies_still_map_to_their_status(payload):
    error = cgp._upstream_error(429, payload)
    assert (error.status, error.error_type) == (429, "rate_limit_error")
    assert len(error.message) <= 4096 + 10 and error.headers["retry-after"]


@pytest.mark.parametrize("message,expected", [
    ("The input token count (1200293) exceeds the maximum number of tokens allowed (1048576).",
     "prompt is too long: 1200293 tokens > 1048576 maximum"),
    ("Unable to submit request because the input token count is 1200293 but model only supports up "
     "to 1048576. Reduce the input token count and try again.",
     "prompt is too long: 1200293 tokens > 1048576 maximum"),
])
def test_context_overflow_wordings_become_the_message_claude_code_compacts_on(message, expected):
    error = cgp._upstream_error(400, json.dumps({"error": gemini_error(400, message)}).encode())
    assert (error.status, error.message) == (400, expected)


# == Signature store ==========================================================

def test_signature_store_evicts_oldest_past_max_entries():
    store = cgp.SignatureStore(b"k", max_entries=2)
    one = cgp.Carried("m", cgp.KIND_CALL, "1", "sig1")
    store.put("a", one)
    store.put("b", one)
    store.get("a")  # a is now the most recent
    store.put("c", one)
    assert store.get("b") is None and store.get("a") == one and store.get("c") == one


def test_signature_store_expires_after_ttl_without_sleeping():
    clock = [100.0]
    store = cgp.SignatureStore(b"k", ttl=3600, now=lambda: clock[0])
    store.put("a", cgp.Carried("m", cgp.KIND_CALL, "", "s"))
    clock[0] += 3599
    assert store.get("a") is not None
    clock[0] += 2
    assert store.get("a") is None and len(store) == 0


def test_signature_store_is_thread_safe():
    store = cgp.SignatureStore(b"k", max_entries=500)

    def work(n):
        for i in range(2000):
            store.put(f"{n}-{i}", cgp.Carried("m", cgp.KIND_CALL, "", "s"))
            store.get(f"{n}-{i // 2}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(store) == 500


def test_carrier_round_trips_and_rejects_tampering_and_other_keys():
    signature = new_signature()
    carried = cgp.Carried("gemini-3.5-flash", cgp.KIND_CALL, "call-9", signature)
    token = cgp._encode_carrier(b"key-one", carried)
    assert cgp.re.match(r"^[A-Za-z0-9_-]+$", token) and len(token) < 200
    assert cgp._decode_carrier(b"key-one", token) == carried
    assert cgp._decode_carrier(b"key-two", token) is None
    flipped = token[:20] + ("A" if token[20] != "A" else "B") + token[21:]
    assert cgp._decode_carrier(b"key-one", flipped) is None
    assert cgp._decode_carrier(b"key-one", "EqQBCkYIBRgCKkDclaudeSignature") is None
    odd = cgp.Carried("m", cgp.KIND_THOUGHT, "", "not-base64_url-safe==")  # kept verbatim
    assert cgp._decode_carrier(b"key-one", cgp._encode_carrier(b"key-one", odd)) == odd


# -- Signatures across turns, instances and restarts --------------------------

TOOLS = [{"name": "Bash", "description": "run", "input_schema": {"type": "object", "properties": {
    "command": {"type": "string"}}, "required": ["command"]}}]


def tool_round_reply(n):
    return Reply(chunk(text(f"Step {n}.")), chunk(call("Bash", {"command": f"echo {n}"}, call_id=f"call-{n}")),
                 chunk(finish="STOP"))


def run_tool_rounds(proxies, gemini, rounds=3, streamed=True, history=None):
    """Drive a Bash tool loop; proxies[i % len] answers round i. Return the final history."""
    history = list(history or [{"role": "user", "content": "run three commands"}])
    for n in range(rounds + 1):
        gemini.script = [tool_round_reply(n) if n < rounds else Reply(chunk(text("All done."), finish="STOP"))]
        body = {"model": "gemini-3.5-flash", "max_tokens": 1000, "messages": history, "tools": TOOLS}
        target = proxies[n % len(proxies)]
        if streamed:
            _, message = stream(target, body)
        else:
            answer = post(target, body)
            assert answer.status == 200, answer.json
            message = answer.json
        history.append({"role": "assistant", "content": message["content"]})
        if n < rounds:
            tool = message["content"][-1]
            assert tool["type"] == "tool_use" and tool["name"] == "Bash"
            history.append({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": tool["id"], "content": f"output {n}"}]})
    return history


def replayed_calls(body):
    return [p for c in body["contents"] if c["role"] == "model" for p in c["parts"] if "functionCall" in p]


def assert_real_signatures_reached_gemini(gemini, replayed_per_body):
    # how many calls each upstream body replays: a history that lost its calls must not pass
    assert [len(replayed_calls(body)) for body in gemini.bodies] == replayed_per_body
    for body in gemini.bodies[1:]:
        for part in replayed_calls(body):
            assert part["thoughtSignature"] in gemini.issued, part
    assert gemini.bypassed == 0


def test_three_tool_rounds_through_one_instance(gemini, proxy):
    history = run_tool_rounds([proxy], gemini)
    assert history[-1]["content"] == [{"type": "text", "text": "All done."}]
    assert_real_signatures_reached_gemini(gemini, [0, 1, 2, 3])
    calls = replayed_calls(gemini.bodies[-1])
    assert [c["functionCall"]["id"] for c in calls] == ["call-0", "call-1", "call-2"]
    responses = [p["functionResponse"] for c in gemini.bodies[-1]["contents"] for p in c["parts"]
                 if "functionResponse" in p]
    assert [r["id"] for r in responses] == ["call-0", "call-1", "call-2"]


def test_three_tool_rounds_through_two_instances_alternating(gemini, start_proxy):
    first, second = start_proxy(make_config(gemini)), start_proxy(make_config(gemini))
    run_tool_rounds([first, second], gemini, streamed=False)
    assert_real_signatures_reached_gemini(gemini, [0, 1, 2, 3])


def test_three_tool_rounds_with_a_restart_between_every_round(gemini, start_proxy):
    history = [{"role": "user", "content": "run three commands"}]
    for n in range(4):
        instance = start_proxy(make_config(gemini))  # a fresh process: empty LRU
        history = run_tool_rounds([instance], gemini, rounds=1, history=history)[:-1] if n < 3 else \
            run_tool_rounds([instance], gemini, rounds=0, history=history)
        instance.stop()
    assert_real_signatures_reached_gemini(gemini, [0, 1, 1, 2, 2, 3, 3])
    assert len(replayed_calls(gemini.bodies[-1])) == 3


def test_instances_with_other_keys_drop_the_carrier_and_use_the_bypass(gemini, start_proxy):
    mine = start_proxy(make_config(gemini))
    history = run_tool_rounds([mine], gemini, rounds=1)[:-1]
    other = start_proxy(make_config(gemini, signature_key=b"another key"))
    gemini.script = [Reply(chunk(text("ok"), finish="STOP"))]
    answer = post(other, {"model": "gemini-3.5-flash", "max_tokens": 100, "messages": history, "tools": TOOLS})
    assert answer.status == 200
    assert replayed_calls(gemini.bodies[-1])[0]["thoughtSignature"] == cgp.BYPASS_SIGNATURE


def test_tampered_carrier_is_dropped_never_forwarded(gemini, proxy):
    history = run_tool_rounds([proxy], gemini, rounds=1)[:-1]
    tool = history[1]["content"][-1]
    token = tool["id"]
    tampered = token[:30] + ("A" if token[30] != "A" else "B") + token[31:]
    tool["id"] = tampered
    history[2]["content"][0]["tool_use_id"] = tampered
    gemini.script = [Reply(chunk(text("ok"), finish="STOP"))]
    answer = post(proxy, {"model": "gemini-3.5-flash", "max_tokens": 100, "messages": history, "tools": TOOLS})
    assert answer.status == 200
    sent = replayed_calls(gemini.bodies[-1])[0]
    assert sent["thoughtSignature"] == cgp.BYPASS_SIGNATURE and "id" not in sent["functionCall"]


def test_history_from_another_gemini_model_goes_without_its_signatures(gemini, proxy):
    history = run_tool_rounds([proxy], gemini, rounds=1)[:-1]
    gemini.script = [Reply(chunk(text("switched"), finish="STOP"))]
    answer = post(proxy, {"model": "gemini-3.1-pro-preview", "max_tokens": 100, "messages": history, "tools": TOOLS})
    assert answer.status == 200  # the fake rejects a 3.5-flash signature sent to 3.1-pro
    assert replayed_calls(gemini.bodies[-1])[0]["thoughtSignature"] == cgp.BYPASS_SIGNATURE


def test_claude_signed_thinking_blocks_are_dropped(gemini, proxy):
    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": [
                   {"type": "thinking", "thinking": "Claude thought", "signature": "EqQBCkYIBRgCKkDclaude=="},
                   {"type": "redacted_thinking", "data": "opaque"},
                   {"type": "tool_use", "id": "toolu_01Fv7RkX2mQ9wHs4JpT6nLcB", "name": "Bash",
                    "input": {"command": "ls"}}]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01Fv7RkX2mQ9wHs4JpT6nLcB",
                                             "content": "a b"}]}]
    answer = post(proxy, {"model": "gemini-3.5-flash", "max_tokens": 100, "messages": history, "tools": TOOLS,
                          "thinking": {"type": "adaptive"}})
    assert answer.status == 200
    model_turn = gemini.bodies[-1]["contents"][1]
    assert model_turn["parts"] == [{"functionCall": {"name": "Bash", "args": {"command": "ls"}},
                                    "thoughtSignature": cgp.BYPASS_SIGNATURE}]


def test_thinking_round_trips_with_its_signature(gemini, proxy):
    signature = new_signature()
    gemini.script = [Reply(chunk(text("Consider.", thought=True, thoughtSignature=signature)),
                           chunk(call("Bash", {"command": "ls"}), finish="STOP"))]
    body = {"model": "gemini-3.5-flash", "max_tokens": 100, "tools": TOOLS, "thinking": {"type": "adaptive"},
            "messages": [{"role": "user", "content": "go"}]}
    _, message = stream(proxy, body)
    assert message["content"][0] == {"type": "thinking", "thinking": "Consider.",
                                     "signature": message["content"][0]["signature"]}
    body["messages"] += [{"role": "assistant", "content": message["content"]},
                         {"role": "user", "content": [{"type": "tool_result",
                                                       "tool_use_id": message["content"][1]["id"], "content": "x"}]}]
    assert post(proxy, body).status == 200
    model_turn = gemini.bodies[-1]["contents"][1]
    assert model_turn["parts"][0] == {"text": "Consider.", "thought": True, "thoughtSignature": signature}
    assert model_turn["parts"][1]["thoughtSignature"] in gemini.issued


def test_first_call_of_every_turn_without_signature_gets_the_bypass():
    request = translate({"messages": [
        {"role": "user", "content": "old"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_old", "name": "Bash", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_old", "content": "x"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "new task"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_n1", "name": "Bash", "input": {}},
                                          {"type": "tool_use", "id": "toolu_n2", "name": "Bash", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_n1", "content": "1"},
                                     {"type": "tool_result", "tool_use_id": "toolu_n2", "content": "2"}]}]})
    calls = replayed_calls(request.body)
    # An earlier turn is not validated, but keeps the bypass it had when it was the current one.
    assert calls[0]["thoughtSignature"] == cgp.BYPASS_SIGNATURE
    assert calls[1]["thoughtSignature"] == cgp.BYPASS_SIGNATURE and "thoughtSignature" not in calls[2]


# == Request: shapes and validation ===========================================
# Seeded mutations of the captured Claude Code bodies above and SDK-shaped ones: whatever a
# client sends is a 200 or an Anthropic-shaped 4xx, never a 500.

def fuzz_corpus():
    png = base64.b64encode(b"\x89PNG fake").decode()
    first = claude_code_request(CC_FIRST_MESSAGES)
    search = CC_FIRST_MESSAGES + [
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "", "signature": "sig"},
            {"type": "tool_use", "id": "toolu_ts", "name": "ToolSearch",
             "input": {"query": "select:WebFetch", "max_results": 5}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_ts", "content": [
            {"type": "tool_reference", "tool_name": "WebFetch"}]}]}]
    sdk = messages_body(
        [{"type": "text", "text": "look"},
         {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}},
         {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                         "data": "doc"}, "title": "t"},
         {"type": "search_result", "source": "https://x", "title": "x",
          "content": [{"type": "text", "text": "found"}]}],
        system="Be brief.", temperature=0.2, top_p=0.9, top_k=20, stop_sequences=["END"],
        thinking={"type": "enabled", "budget_tokens": 2048},
        tool_choice={"type": "tool", "name": "Read"},
        tools=[{"name": "Read", "description": "d", "input_schema": {"type": "object"}}])
    return [first, claude_code_request(search, tools=CC_TOOLS[:2] + [CC_WEBFETCH]),
            CC_WEB_SEARCH, dict(messages_body(), messages=tool_round(
                {"content": image_result()[0], "is_error": True})), sdk]


FUZZ_TYPES = ["text", "image", "document", "tool_use", "tool_result", "thinking",
              "search_result", "tool_reference", "base64", "url", "content", "enabled", "tool"]
FUZZ_VALUES = [None, 0, -1, 2.5, 10 ** 30, 1e308, float("nan"), float("-inf"), True, "", "x",
               "\ud83d", "broken \ude00 half", [], [None], [1, "a"], {}, {"type": 5},
               {"type": "text"}, nested(140)]


def fuzz_slots(value, slots):
    """Collect (container, key) for every place inside value."""
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in list(items):
        slots.append((value, key))
        if isinstance(item, (dict, list)):
            fuzz_slots(item, slots)
    return slots


def mutate(body, rnd):
    """Return a copy of body with one to three seeded mutations."""
    body = json.loads(json.dumps(body))
    for _ in range(rnd.randint(1, 3)):
        slots = fuzz_slots(body, [])
        if not slots:
            break
        container, key = rnd.choice(slots)
        roll, old = rnd.random(), container[key]
        if roll < 0.45:
            container[key] = json.loads(json.dumps(rnd.choice(FUZZ_VALUES)))
        elif roll < 0.6:
            container[key] = rnd.choice(FUZZ_TYPES)
        elif roll < 0.75 and isinstance(container, dict):
            del container[key]
        elif isinstance(old, str):
            at = rnd.randint(0, len(old))
            container[key] = old[:at] + rnd.choice(["\ud800", "\udfff", "\x00", "\U0001F600"]) + old[at:]
        elif isinstance(old, list):
            container[key] = old * rnd.randint(0, 3)
        elif isinstance(old, (int, float)) and not isinstance(old, bool):
            container[key] = rnd.choice([0, -old, old * 10 ** 20, 0.5])
        else:
            container[key] = {"wrapped": old}
    return body


def fuzz_bytes(body, rnd):
    """Return the body as JSON bytes: surrogates escaped, or raw in the bytes now and then."""
    text = json.dumps(body, ensure_ascii=rnd.random() < 0.7)
    return text.encode("utf-8", "surrogatepass")


def test_fuzzed_bodies_are_translated_or_refused_naming_a_field():
    rnd, corpus, outcomes = random.Random(1313), fuzz_corpus(), {"ok": 0, "refused": 0}
    config, store = cgp.Config(), cgp.SignatureStore(b"k" * 32)
    for _ in range(3000):
        raw = fuzz_bytes(mutate(rnd.choice(corpus), rnd), rnd)
        try:
            request = cgp.to_gemini_request(cgp._decode_json_body(raw), config, store)
            json.dumps(request.body, ensure_ascii=False).encode()  # what goes upstream
            outcomes["ok"] += 1
        except cgp.ProxyError as error:
            assert 400 <= error.status < 500 and error.message, raw
            outcomes["refused"] += 1
    assert outcomes["ok"] > 300 and outcomes["refused"] > 300, outcomes


def test_fuzzed_bodies_over_http_get_200_or_anthropic_4xx_and_the_proxy_goes_on(gemini, proxy):
    rnd, corpus = random.Random(31), fuzz_corpus()
    statuses = []
    for i in range(120):
        path = "/v1/messages/count_tokens" if i % 4 == 0 else "/v1/messages"
        answer = request(proxy, "POST", path, raw=fuzz_bytes(mutate(rnd.choice(corpus), rnd), rnd))
        statuses.append(answer.status)
        assert answer.status == 200 or 400 <= answer.status < 500, (answer.status, answer.raw)
        if answer.status != 200:
            assert answer.json["type"] == "error" and set(answer.json["error"]) == {"type", "message"}
    assert statuses.count(200) > 10 and len(set(statuses)) > 1
    assert post(proxy, messages_body()).status == 200


# == Request: Anthropic -> Gemini =============================================

def translate(body, model="gemini-3.5-flash", store=None, **config):
    body = dict({"model": model, "max_tokens": 100}, **body)
    return cgp.to_gemini_request(body, cgp.Config(**config), store or cgp.SignatureStore(b"k" * 32))


def note(text):
    return {"text": f"<system-message>\n{text}\n</system-message>"}


def test_only_top_level_system_forms_system_instruction_and_system_messages_stay_in_place():
    request = translate({"system": [
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.331.44a;"},
        {"type": "text", "text": "You are helpful.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "Be brief."},
                     {"role": "assistant", "content": "ok"},
                     {"role": "system", "content": [{"type": "text", "text": "Reminder.",
                                                     "cache_control": {"type": "ephemeral"}}]},
                     {"role": "user", "content": "go"}]})
    assert request.body["systemInstruction"] == {"parts": [{"text": "You are helpful."}]}
    assert request.body["contents"] == [
        {"role": "user", "parts": [{"text": "hi"}, note("Be brief.")]},
        {"role": "model", "parts": [{"text": "ok"}]},
        {"role": "user", "parts": [note("Reminder."), {"text": "go"}]}]
    assert "cache_control" not in json.dumps(request.body)


def test_mid_conv_system_blocks_become_notes_where_they_stand():
    request = translate({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "mid_conv_system", "content": [
            {"type": "text", "text": "Use tabs."}], "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}, {"type": "mid_conv_system",
                                                                         "content": [{"type": "text", "text": "Later."}]}]},
        {"role": "user", "content": "c"}]})
    assert request.body["contents"] == [
        {"role": "user", "parts": [{"text": "a"}, note("Use tabs."), {"text": "b"}]},
        {"role": "model", "parts": [{"text": "ok"}]},  # never in the model's own mouth
        {"role": "user", "parts": [note("Later."), {"text": "c"}]}]
    assert "systemInstruction" not in request.body


def test_system_note_after_a_tool_call_follows_the_function_response():
    request = translate({"messages": tool_loop_messages()[:2] + [
        {"role": "system", "content": "Tasks are idle."}] + tool_loop_messages()[2:]})
    assert [list(p) for p in request.body["contents"][2]["parts"]] == [["functionResponse"], ["text"]]
    assert request.body["contents"][2]["parts"][1] == note("Tasks are idle.")


def test_consecutive_turns_of_one_role_are_merged():
    request = translate({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": [
        {"type": "text", "text": "b"}]}, {"role": "assistant", "content": "c"}]})
    assert request.body["contents"] == [{"role": "user", "parts": [{"text": "a"}, {"text": "b"}]},
                                        {"role": "model", "parts": [{"text": "c"}]}]


def test_images_and_documents_become_inline_and_file_data():
    png = base64.b64encode(b"\x89PNG fake").decode()
    request = translate({"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.webp"}},
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}},
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "plain doc"}},
        {"type": "text", "text": "describe"}]}]})
    assert request.body["contents"][0]["parts"] == [
        {"inlineData": {"mimeType": "image/png", "data": png}},
        {"fileData": {"mimeType": "image/webp", "fileUri": "https://example.com/cat.webp"}},
        {"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0="}},
        {"text": "plain doc"}, {"text": "describe"}]


def test_gif_gets_a_clear_400_from_the_proxy(gemini, proxy):
    body = messages_body([{"type": "image", "source": {"type": "base64", "media_type": "image/gif", "data": "R0lG"}}])
    answer = post(proxy, body)
    assert answer.status == 400 and answer.json["error"]["type"] == "invalid_request_error"
    assert "image/gif is not supported" in answer.json["error"]["message"]
    assert gemini.bodies == []


def tool_loop_messages(result_content="file text", is_error=False):
    return [
        {"role": "user", "content": "read it"},
        {"role": "assistant", "content": [{"type": "text", "text": "Reading."},
                                          {"type": "tool_use", "id": "toolu_a", "name": "Read",
                                           "input": {"file_path": "/a"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_a",
                                      "content": result_content, "is_error": is_error}]},
    ]


def test_tool_use_and_tool_result_become_function_call_and_response():
    request = translate({"messages": tool_loop_messages()})
    model_turn, user_turn = request.body["contents"][1:]
    assert model_turn["parts"][1]["functionCall"] == {"name": "Read", "args": {"file_path": "/a"}}
    assert user_turn["parts"] == [{"functionResponse": {"name": "Read", "response": {"result": "file text"}}}]


def test_tool_error_stays_visible_to_the_model():
    request = translate({"messages": tool_loop_messages("<tool_use_error>no such file</tool_use_error>", True)})
    response = request.body["contents"][2]["parts"][0]["functionResponse"]["response"]
    assert response == {"error": "<tool_use_error>no such file</tool_use_error>"}


def image_result():
    png = base64.b64encode(b"png bytes").decode()
    return [{"type": "text", "text": "screenshot"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}}], png


def test_images_in_tool_results_go_inside_function_response_on_gemini_3():
    content, png = image_result()
    request = translate({"messages": tool_loop_messages(content)}, model="gemini-3.5-flash")
    parts = request.body["contents"][2]["parts"]
    assert parts == [{"functionResponse": {"name": "Read", "response": {"result": "screenshot"},
                                           "parts": [{"inlineData": {"mimeType": "image/png", "data": png}}]}}]


def test_images_in_tool_results_follow_the_responses_on_older_models():
    content, png = image_result()
    request = translate({"messages": tool_loop_messages(content)}, model="gemini-2.5-flash")
    parts = request.body["contents"][2]["parts"]
    assert parts == [{"functionResponse": {"name": "Read", "response": {"result": "screenshot"}}},
                     {"inlineData": {"mimeType": "image/png", "data": png}}]


def test_parallel_calls_keep_order_and_responses_come_first_in_call_order():
    request = translate({"messages": [
        {"role": "user", "content": "two things"},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"file_path": "/1"}},
            {"type": "tool_use", "id": "toolu_2", "name": "Bash", "input": {"command": "ls"}}]},
        {"role": "user", "content": [
            {"type": "text", "text": "also this"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": "listing"},
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "contents"}]}]})
    calls = [p["functionCall"]["name"] for p in request.body["contents"][1]["parts"]]
    assert calls == ["Read", "Bash"]
    parts = request.body["contents"][2]["parts"]
    assert [p.get("functionResponse", {}).get("name") for p in parts] == ["Read", "Bash", None]
    assert parts[0]["functionResponse"]["response"] == {"result": "contents"}
    assert parts[2] == {"text": "also this"}


def test_missing_and_orphan_tool_results_still_give_gemini_matching_counts():
    request = translate({"messages": [
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_gone", "content": "old"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_x", "name": "Read", "input": {}}]},
        {"role": "user", "content": "carry on"}]})
    first, _, last = request.body["contents"]
    assert first["parts"][0]["text"].endswith("old")
    assert "functionResponse" in last["parts"][0] and last["parts"][1] == {"text": "carry on"}


def test_tools_keep_full_json_schema_minus_root_schema_keyword():
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
              "properties": {"mode": {"const": "x"}, "tags": {"type": "array", "items": {"type": "string"}},
                             "v": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                             "m": {"type": "object", "propertyNames": {"pattern": "^a"}}},
              "required": ["mode"], "additionalProperties": False}
    request = translate({"messages": [{"role": "user", "content": "hi"}],
                         "tools": [{"name": "T", "description": "d", "input_schema": schema,
                                    "cache_control": {"type": "ephemeral"}}]})
    declaration = request.body["tools"][0]["functionDeclarations"][0]
    expected = dict(schema)
    del expected["$schema"]
    assert declaration == {"name": "T", "description": "d", "parametersJsonSchema": expected}


def test_tools_loaded_by_tool_search_are_declared_last_in_load_order():
    deferred = [{"name": n, "defer_loading": True, "input_schema": {"type": "object"}} for n in ("A", "C")]
    tools = [deferred[0], {"name": "B", "input_schema": {"type": "object"}}, deferred[1]]
    loads = [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_s", "content": [
        {"type": "tool_reference", "tool_name": name}]}]} for name in ("C", "A")]
    messages = [{"role": "user", "content": "go"}, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_s", "name": "ToolSearch", "input": {}}]}, loads[0],
        {"role": "assistant", "content": "ok"}, dict(loads[1], content=[dict(loads[1]["content"][0])])]
    assert declared(translate({"tools": tools, "messages": messages[:3]}).body) == ["B", "C"]
    assert declared(translate({"tools": tools, "messages": messages}).body) == ["B", "C", "A"]


def test_body_keys_put_what_every_turn_shares_before_contents():
    body = translate({"system": "s", "tools": TOOLS, "messages": [{"role": "user", "content": "hi"}]}).body
    assert list(body) == ["systemInstruction", "tools", "toolConfig", "generationConfig", "safetySettings",
                          "contents"]


# The tool schemas MCP servers sent in 2026 that Gemini refused (late-2026.md §3.4).
REJECTED_SCHEMAS = {
    "items next to a union with array": (
        {"type": "object", "properties": {"paths": {"type": ["array", "string"], "items": {"type": "string"}}},
         "required": ["paths"]}, []),
    "boolean subschema": (
        {"type": "object", "properties": {"key": {"type": "string"}, "value": True}, "required": ["key", "value"]},
        ["`value`: any JSON value"]),
    "items with a type union including null": (
        {"type": "object", "properties": {"rows": {"type": "array", "items": {
            "type": ["object", "null"], "properties": {"id": {"type": "integer"}}, "additionalProperties": False}}}},
        []),
    "integer enum on an array-or-null property": (
        {"type": "object", "properties": {"levels": {"type": ["array", "null"], "items": {"type": "integer"},
                                                     "enum": [1, 2, 3]}}}, ["`levels`: one of 1, 2, 3"]),
    "$ref/$defs cycle": (
        {"type": "object", "properties": {"tree": {"$ref": "#/$defs/Node"}}, "required": ["tree"],
         "$defs": {"Node": {"type": "object", "properties": {
             "name": {"type": "string", "const": "root"}, "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}}}}}},
        ["`tree.children[]`: refers to itself #/$defs/Node"]),
    "JSON Schema extras": (
        {"type": "object", "properties": {"n": {"type": "integer", "exclusiveMinimum": 0, "multipleOf": 2},
                                          "pick": {"oneOf": [{"type": "string", "format": "uri"}, {"type": "null"}]},
                                          "all": {"allOf": [{"properties": {"a": {"type": "string"}}},
                                                            {"required": ["a"]}]}}},
        ["`n`: exclusiveMinimum 0", "`n`: multipleOf 2"]),
}


@pytest.mark.parametrize("case", REJECTED_SCHEMAS)
def test_rejected_tool_schema_reduces_to_what_gemini_parameters_accepts(case):
    schema, notes = REJECTED_SCHEMAS[case]
    assert schema_problem(schema, "parameters")  # what real Gemini's `parameters` refuses
    declaration = cgp._repaired_declaration({"name": "mcp__srv__query", "description": "Query.",
                                            "parametersJsonSchema": schema})
    assert schema_problem(declaration["parameters"], "parameters") is None
    assert set(declaration) == {"name", "description", "parameters"}
    for note in notes:
        assert note in declaration["description"]
    assert declaration["description"].startswith("Query.")
    assert ("not declared" in declaration["description"]) == bool(notes)


def test_reduced_schemas_keep_what_gemini_can_say():
    paths, _ = cgp._reduce_tool_schema(REJECTED_SCHEMAS["items next to a union with array"][0])
    assert paths["properties"]["paths"] == {"anyOf": [{"type": "array", "items": {"type": "string"}},
                                                      {"type": "string"}]}
    rows, _ = cgp._reduce_tool_schema(REJECTED_SCHEMAS["items with a type union including null"][0])
    assert rows["properties"]["rows"]["items"] == {"type": "object", "properties": {"id": {"type": "integer"}},
                                                   "nullable": True}
    tree, _ = cgp._reduce_tool_schema(REJECTED_SCHEMAS["$ref/$defs cycle"][0])
    assert tree["required"] == ["tree"]
    assert tree["properties"]["tree"]["properties"] == {"name": {"type": "string", "enum": ["root"]}}
    extras, _ = cgp._reduce_tool_schema(REJECTED_SCHEMAS["JSON Schema extras"][0])
    assert extras["properties"]["pick"] == {"type": "string", "format": "uri", "nullable": True}
    assert extras["properties"]["all"] == {"type": "object", "properties": {"a": {"type": "string"}},
                                           "required": ["a"]}
    assert cgp._reduce_tool_schema({"type": "object", "properties": {}}) == (None, [])


def test_a_400_pointing_into_tools_names_the_client_tool():
    request = translate({"messages": [{"role": "user", "content": "hi"}], "tools": [
        {"name": "Read", "input_schema": {"type": "object"}},
        {"name": "mcp__srv__query" + "x" * 60, "input_schema": {"type": "object"}}]})
    message = ("* GenerateContentRequest.tools[0].function_declarations[1].parameters.properties[paths].items: "
               "field predicate failed: $type == Type.ARRAY")
    error = cgp._upstream_error(400, json.dumps({"error": gemini_error(400, message)}).encode())
    named = cgp._name_rejected_tools(error, request)
    assert named.message == f"tool `mcp__srv__query{'x' * 60}` has an input schema Gemini rejects: {message}"
    assert (named.status, named.error_type, named.headers) == (400, "invalid_request_error", error.headers)
    assert cgp._rejected_declarations(error, request.body) == [request.body["tools"][0]["functionDeclarations"][1]]
    other = cgp._upstream_error(400, json.dumps({"error": gemini_error(400, "contents[2] is bad")}).encode())
    assert cgp._name_rejected_tools(other, request) is other


def test_server_tools_are_left_out_not_rejected():
    request = translate({"messages": [{"role": "user", "content": "hi"}], "tools": [
        {"type": "web_search_20250305", "name": "web_search"},
        {"type": "code_execution_20250825", "name": "code_execution"},
        {"name": "Read", "input_schema": {"type": "object"}}]})
    assert [d["name"] for d in request.body["tools"][0]["functionDeclarations"]] == ["Read"]


def test_long_and_odd_tool_names_are_renamed_and_mapped_back(gemini, proxy):
    long_name = "mcp__a_very_long_server_name_for_testing__and_an_even_longer_tool_name_here"
    odd_name = "9tool with spaces"
    tools = [{"name": long_name, "input_schema": {"type": "object"}},
             {"name": odd_name, "input_schema": {"type": "object"}}]
    request = translate({"messages": [{"role": "user", "content": "hi"}], "tools": tools})
    names = [d["name"] for d in request.body["tools"][0]["functionDeclarations"]]
    assert all(cgp.GEMINI_NAME_RE.match(n) for n in names) and len(set(names)) == 2
    gemini.script = [Reply(chunk(call(names[0], {"a": 1}), call(names[1], {}), finish="STOP"))]
    answer = post(proxy, messages_body(tools=tools))
    assert [b["name"] for b in answer.json["content"]] == [long_name, odd_name]
    assert gemini.bodies[0]["tools"][0]["functionDeclarations"][0]["name"] == names[0]


@pytest.mark.parametrize("choice,expected", [
    ({"type": "auto"}, {"mode": "AUTO"}),
    ({"type": "any"}, {"mode": "ANY"}),
    ({"type": "tool", "name": "Read"}, {"mode": "ANY", "allowedFunctionNames": ["Read"]}),
    ({"type": "none"}, {"mode": "NONE"}),
    ({"type": "tool", "name": "NotDeclared"}, {"mode": "AUTO"}),
])
def test_tool_choice_mapping(choice, expected):
    request = translate({"messages": [{"role": "user", "content": "hi"}], "tool_choice": choice,
                         "tools": [{"name": "Read", "input_schema": {"type": "object"}}]})
    assert request.body["toolConfig"] == {"functionCallingConfig": expected}


def test_generation_config_and_clamps():
    request = translate({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000,
                         "temperature": 0.5, "top_p": 0.9, "top_k": 40,
                         "stop_sequences": ["a", "b", "c", "d", "e", "f", "g"]}, model="gemini-3.5-flash")
    generation = request.body["generationConfig"]
    assert generation["maxOutputTokens"] == 60000
    assert (generation["temperature"], generation["topP"], generation["topK"]) == (0.5, 0.9, 40)
    assert "stopSequences" not in generation  # the proxy cuts them all: see ResponseFold._text
    assert request.stop_sequences == ("a", "b", "c", "d", "e", "f", "g")
    default = translate({"messages": [{"role": "user", "content": "hi"}], "max_tokens": None})
    assert default.body["generationConfig"]["maxOutputTokens"] == 32768


@pytest.mark.parametrize("model,thinking,effort,expected", [
    ("gemini-2.5-flash", {"type": "enabled", "budget_tokens": 5000}, None,
     {"thinkingBudget": 5000, "includeThoughts": True}),
    ("gemini-3.5-flash", {"type": "enabled", "budget_tokens": 2000}, None,
     {"thinkingLevel": "LOW", "includeThoughts": True}),
    ("gemini-3.5-flash", {"type": "enabled", "budget_tokens": 31999}, None,
     {"thinkingLevel": "HIGH", "includeThoughts": True}),
    ("gemini-3.5-flash", {"type": "disabled"}, None, {"thinkingLevel": "MINIMAL"}),
    ("gemini-3.8-flash", {"type": "disabled"}, None, {"thinkingLevel": "LOW"}),
    ("gemini-3.1-pro-preview", {"type": "disabled"}, None, {"thinkingLevel": "LOW"}),
    ("gemini-2.5-flash", {"type": "disabled"}, None, {"thinkingBudget": 0}),
    ("gemini-2.5-pro", {"type": "disabled"}, None, {"thinkingBudget": 128}),
    ("gemini-3.5-flash", {"type": "adaptive"}, "low", {"thinkingLevel": "LOW", "includeThoughts": True}),
    ("gemini-3.5-flash", {"type": "adaptive"}, "medium", {"thinkingLevel": "MEDIUM", "includeThoughts": True}),
    ("gemini-3.5-flash", {"type": "adaptive"}, "high", {"thinkingLevel": "HIGH", "includeThoughts": True}),
    ("gemini-3.5-flash", {"type": "adaptive"}, "max", {"thinkingLevel": "HIGH", "includeThoughts": True}),
    ("gemini-2.5-flash", {"type": "adaptive"}, "high", {"thinkingBudget": 16384, "includeThoughts": True}),
    ("gemini-2.5-flash", {"type": "adaptive"}, "max", {"thinkingBudget": 24576, "includeThoughts": True}),
    # Claude Code's helper calls (WebFetch summary, WebSearch, /rename): effort high, no thinking field.
    ("gemini-3.5-flash", None, "high", {"thinkingLevel": "MINIMAL"}),
    ("gemini-3.1-pro-preview", None, "max", {"thinkingLevel": "LOW"}),
    ("gemini-2.5-flash", None, "high", {"thinkingBudget": 0}),
    ("gemini-2.5-pro", None, None, {"thinkingBudget": 128}),
    ("gemini-3.5-flash", {"type": "disabled"}, "max", {"thinkingLevel": "MINIMAL"}),
    ("gemini-2.0-flash", None, "high", None),  # cannot think: no thinkingConfig at all
])
def test_thinking_maps_per_model_family(model, thinking, effort, expected):
    body = {"messages": [{"role": "user", "content": "hi"}]}
    if thinking:
        body["thinking"] = thinking
    if effort:
        body["output_config"] = {"effort": effort}
    request = translate(body, model=model)
    assert request.body["generationConfig"].get("thinkingConfig") == expected
    assert request.thinking == ("summarized" if thinking and thinking["type"] != "disabled" else "")


def test_structured_output_becomes_response_json_schema():
    schema = {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"],
              "additionalProperties": False}
    request = translate({"messages": [{"role": "user", "content": "title?"}],
                         "output_config": {"format": {"type": "json_schema", "schema": schema}},
                         "context_management": {"edits": []}, "metadata": {"user_id": "u"}})
    generation = request.body["generationConfig"]
    assert generation["responseMimeType"] == "application/json" and generation["responseJsonSchema"] == schema
    assert "context_management" not in json.dumps(request.body) and "user_id" not in json.dumps(request.body)


@pytest.mark.parametrize("body,field", [
    ({"messages": []}, "model"),
    ({"model": "gemini-3.5-flash"}, "messages"),
    ({"model": 5, "messages": []}, "model"),
    ({"model": "m", "messages": "hi"}, "messages"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": "10"}, "max_tokens"),
    ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"model": "m", "messages": [{"role": "user", "content": 7}]}, "messages.0.content"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop_sequences": [1]}, "stop_sequences.0"),
])
def test_wrong_input_is_400_naming_the_field(gemini, proxy, body, field):
    answer = post(proxy, body)
    assert answer.status == 400 and answer.json["error"]["type"] == "invalid_request_error"
    assert answer.json["error"]["message"].startswith(field), answer.json
    assert gemini.bodies == []


def tool_round(result_block=None, use=None):
    """Return messages with one tool round; `result_block`/`use` override the two blocks."""
    use = dict({"type": "tool_use", "id": "toolu_a", "name": "Read", "input": {}}, **(use or {}))
    result = dict({"type": "tool_result", "tool_use_id": "toolu_a", "content": "ok"},
                  **(result_block or {}))
    return [{"role": "user", "content": "go"}, {"role": "assistant", "content": [use]},
            {"role": "user", "content": [{"type": "text", "text": "see"}, result]}]


@pytest.mark.parametrize("extra,path", [
    ({"output_config": {"effort": ["high"]}}, "output_config.effort: must be a string"),
    ({"tool_choice": {"type": ["auto"]}}, "tool_choice.type: must be a string"),
    ({"messages": tool_round({"tool_use_id": ["toolu_a"]})},
     "messages.2.content.1.tool_use_id: must be a string"),
    ({"messages": tool_round({"tool_use_id": {"id": "toolu_a"}})},
     "messages.2.content.1.tool_use_id: must be a string"),
    ({"messages": tool_round({"content": [{"type": "text", "text": 7}]})},
     "messages.2.content.1.content.0.text: must be a string"),
    ({"messages": tool_round({"content": [{"type": "tool_reference", "tool_name": 1}]})},
     "messages.2.content.1.content.0.tool_name: must be a string"),
    ({"messages": tool_round({"content": [{"type": "search_result", "source": "s", "title": "t",
                                           "content": 5}]})},
     "messages.2.content.1.content.0.content: must be an array"),
    ({"messages": [{"role": "assistant", "content": [
        {"type": "thinking", "thinking": "t", "signature": 5}]}]},
     "messages.0.content.0.signature: must be a string"),
    ({"messages": [{"role": "assistant", "content": [
        {"type": "thinking", "thinking": "t", "signature": ["s"]}]}]},
     "messages.0.content.0.signature: must be a string"),
    ({"messages": tool_round(use={"id": None})}, "messages.1.content.0.id: field required"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search", "allowed_domains": [3]}]},
     "tools.0.allowed_domains.0: must be a string"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {
        "type": "base64", "media_type": "text/plain", "data": "abc"}}]}]},
     "messages.0.content.0.source.data: must be base64"),
    ({"max_tokens": 0}, "max_tokens: must be at least 1"),
    ({"max_tokens": True}, "max_tokens: must be an integer"),
    ({"temperature": float("nan")}, "temperature: must be a finite number"),
    ({"metadata": {"weights": [1, float("inf")]}}, "metadata.weights.1: must be a finite number"),
    ({"stop_sequences": ["ok", ""]}, "stop_sequences.1: must not be empty"),
    ({"stop_sequences": ["s"] * 65}, "stop_sequences: must have at most 64 items"),
    ({"stop_sequences": ["x" * 1001]}, "stop_sequences.0: must be at most 1000 characters"),
    ({"metadata": {"deep": nested(130)}}, "metadata.deep." + ".".join(["0"] * 126)
     + ": nested deeper than 128 levels"),
])
def test_wrong_types_anywhere_are_400_naming_the_path(gemini, proxy, extra, path):
    answer = post(proxy, dict(messages_body(), **extra))
    assert answer.status == 400 and answer.json["error"]["type"] == "invalid_request_error"
    assert answer.json["error"]["message"] == path
    assert gemini.bodies == [] and post(proxy, messages_body()).status == 200


@pytest.mark.parametrize("raw,message", [
    (b'{"model": "m", "max_tokens": NaN, "messages": []}', "max_tokens: must be an integer"),
    (b'{"model": "m", "temperature": Infinity, "messages": []}',
     "temperature: must be a finite number"),
    (b'{"model": "m", "top_p": 1e999, "messages": []}', "top_p: must be a finite number"),
    (b'{"model": "m", "messages": []' + b', "metadata": ' + b"[" * 100000 + b"]" * 100000 + b"}",
     "request body: nested deeper than 128 levels"),
])
def test_nan_infinity_and_runaway_nesting_are_400(gemini, proxy, raw, message):
    answer = request(proxy, "POST", "/v1/messages", raw=raw)
    assert answer.status == 400 and answer.json["error"]["message"] == message
    assert post(proxy, messages_body()).status == 200


def test_count_tokens_body_is_checked_by_the_same_description(gemini, proxy):
    body = {"model": "gemini-3.5-flash", "messages": tool_round({"is_error": "yes"})}
    answer = post(proxy, body, path="/v1/messages/count_tokens")
    assert answer.status == 400
    assert answer.json["error"]["message"] == "messages.2.content.1.is_error: must be a boolean"
    assert gemini.bodies == []


def test_a_new_block_type_is_one_entry_in_the_description(monkeypatch):
    body = {"messages": [{"role": "user", "content": [{"type": "note_block", "note": 5},
                                                       {"type": "text", "text": "hi"}]}]}
    translate(body)  # unknown types pass: only described ones are checked
    monkeypatch.setitem(cgp.CONTENT_BLOCKS, "note_block", cgp._Obj({"note": cgp.STRING}))
    with pytest.raises(cgp.ProxyError, match=r"^messages\.0\.content\.0\.note: must be a string$"):
        translate(body)


@pytest.mark.parametrize("raw_text", [
    b'"broken \\ud83d emoji"',  # escaped lone high surrogate
    b'"broken \\ude00 emoji"',  # escaped lone low surrogate
    b'"broken \xed\xa0\xbd emoji"',  # raw (CESU-8) lone surrogate in the bytes
])
def test_lone_surrogates_become_replacement_characters(gemini, proxy, caplog, raw_text):
    caplog.set_level("DEBUG", logger="claude_gemini_proxy")
    raw = (b'{"model": "gemini-3.5-flash", "max_tokens": 50, "messages": [{"role": "user", '
           b'"content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": '
           + raw_text + b'}]}, {"role": "user", "content": "and now?"}]}')
    for _ in range(2):  # every later turn of the conversation works too
        answer = request(proxy, "POST", "/v1/messages", raw=raw)
        assert answer.status == 200, answer.raw
    assert gemini.bodies[-1]["contents"][1]["parts"][0]["text"] == "broken \ufffd emoji"
    assert "U+FFFD in the request at messages.1.content.0.text" in caplog.text


def test_a_valid_surrogate_pair_is_kept():
    body = cgp._decode_json_body(b'{"a": "\\ud83d\\ude00", "b": "\xed\xa0\xbd\xed\xb8\x80"}')
    assert body == {"a": "\U0001F600", "b": "\U0001F600"}


# -- New blocks (late 2026) ---------------------------------------------------
# Shapes from the anthropic 2.x SDK's types (types/beta/beta_request_tool_addition_block_param.py,
# beta_search_result_block_param.py, beta_compaction_block_param.py, beta_fallback_block_param.py).

MCP_TOOLS = [dict(CC_WEBFETCH, name=f"mcp__github__{name}", description=f"GitHub {name}.")
             for name in ("create_issue", "list_issues")]
INLINE_CLOCK = {"name": "Clock", "description": "Tells the time.",
                "input_schema": {"type": "object", "properties": {"zone": {"type": "string"}}}}


def tool_change(kind, tool):
    return {"role": "system", "content": [{"type": kind, "tool": tool}]}


def test_tool_addition_declares_deferred_tools_and_tool_removal_withdraws_them(gemini, proxy):
    tools = CC_TOOLS[:2] + [CC_WEBFETCH] + MCP_TOOLS
    history = CC_FIRST_MESSAGES + [
        tool_change("tool_addition", {"type": "tool_reference", "name": "WebFetch"}),
        {"role": "assistant", "content": [{"type": "text", "text": "WebFetch is ready."}]},
        {"role": "user", "content": "Now use GitHub, and stop using Bash."},
        tool_change("tool_addition", {"type": "mcp_toolset_reference", "server_name": "github"}),
        tool_change("tool_removal", {"type": "tool_reference", "name": "Bash"}),
        tool_change("tool_addition", {"type": "tool_definition", "definition": INLINE_CLOCK})]
    gemini.script = [Reply(chunk(call("mcp__github__create_issue", {"url": "u", "prompt": "p"}), finish="STOP"))]
    _, message = cc_stream(proxy, claude_code_request(history, tools=tools))
    sent = gemini.bodies[-1]
    assert declared(sent) == ["ToolSearch", "WebFetch", "mcp__github__create_issue", "mcp__github__list_issues",
                              "Clock"]
    clock = sent["tools"][0]["functionDeclarations"][-1]
    assert clock["parametersJsonSchema"] == INLINE_CLOCK["input_schema"]
    assert message["content"][-1]["name"] == "mcp__github__create_issue" and message["stop_reason"] == "tool_use"
    assert "tool_addition" not in json.dumps(sent)  # directives are read, never sent as text
    later = history + [
        {"role": "assistant", "content": [{"type": "text", "text": "Done."}]},
        {"role": "user", "content": "Drop WebFetch and one GitHub tool; bring Bash back."},
        tool_change("tool_removal", {"type": "tool_reference", "name": "WebFetch"}),
        tool_change("tool_removal", {"type": "mcp_tool_reference", "server_name": "github", "name": "list_issues"}),
        tool_change("tool_addition", {"type": "tool_reference", "name": "Bash"})]
    _, message = cc_stream(proxy, claude_code_request(later, tools=tools))
    assert declared(gemini.bodies[-1]) == ["Bash", "ToolSearch", "mcp__github__create_issue", "Clock"]
    assert message["stop_reason"] == "end_turn"


def test_compaction_tool_changes_count_as_tool_changes(gemini, proxy):
    compaction = {"type": "compaction", "content": "Summary: WebFetch was loaded.", "encrypted_content": "e",
                  "tool_changes": [{"type": "tool_addition", "tool": {"type": "tool_reference", "name": "WebFetch"}}]}
    history = [{"role": "assistant", "content": [compaction]}, {"role": "user", "content": "Go on."}]
    _, message = cc_stream(proxy, claude_code_request(history, tools=CC_TOOLS[:2] + [CC_WEBFETCH]))
    sent = gemini.bodies[-1]
    assert declared(sent) == ["Bash", "ToolSearch", "WebFetch"]
    assert sent["contents"][1] == {"role": "model", "parts": [{"text": "Summary: WebFetch was loaded."}]}
    assert message["content"][-1]["text"] == "Hello from Gemini."


def test_search_results_compaction_and_server_artefacts_become_text_or_are_dropped(gemini, proxy, caplog):
    caplog.set_level("WARNING", logger="claude_gemini_proxy")
    odd = "hologram_" + secrets.token_hex(3)  # warnings are once per process: a type no other test used
    search = {"type": "search_result", "source": "https://docs.example/a", "title": "Doc A",
              "content": [{"type": "text", "text": "A says 42."}], "citations": {"enabled": True}}
    body = messages_body(messages=[
        {"role": "user", "content": [
            {"type": "text", "text": "Look this up."}, search,
            {"type": "container_upload", "file_id": "file_1"}]},
        {"role": "assistant", "content": [
            {"type": "compaction", "content": None, "encrypted_content": "x"},
            {"type": "compaction", "content": "Earlier: the user asked about A."},
            {"type": "fallback", "from": {"model": "claude-opus-5"}, "to": {"model": "claude-sonnet-5"},
             "trigger": None},
            {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "a"}},
            {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []},
            {"type": "advisor_tool_result", "tool_use_id": "srvtoolu_2",
             "content": {"type": "advisor_result", "text": "secret advice", "stop_reason": "end_turn"}},
            {"type": "redacted_thinking", "data": "abc"},
            {"type": "tool_use", "id": "toolu_s1", "name": "lookup", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_s1", "content": [search]},
            {"type": "future_note", "text": "Keep answers short."},
            {"type": odd, "payload": {"x": 1}}]}])
    for _ in range(2):
        answer = post(proxy, body)
        assert answer.status == 200, answer.raw
        assert answer.json["content"] == [{"type": "text", "text": "Hello from Gemini."}]
    user, model, last = gemini.bodies[-1]["contents"]
    assert user["parts"] == [{"text": "Look this up."}, {"text": "Doc A (https://docs.example/a)\nA says 42."}]
    assert model["parts"][0] == {"text": "Earlier: the user asked about A."}
    assert [list(p) for p in model["parts"]] == [["text"], ["functionCall", "thoughtSignature"]]  # rest dropped
    result = last["parts"][0]["functionResponse"]["response"]["result"]
    assert result == "Doc A (https://docs.example/a)\nA says 42."
    assert last["parts"][1:] == [{"text": "Keep answers short."}]
    sent = json.dumps(gemini.bodies[-1])
    assert "secret advice" not in sent and "file_1" not in sent and odd not in sent
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len([w for w in warnings if odd in w]) == 1, warnings  # once per type per process
    assert not [w for w in warnings if "future_note" in w or "compaction" in w or "fallback" in w]


# == Response: Gemini -> Anthropic ============================================

def fold_for(body=None, model="gemini-3.5-flash", store=None, **extra):
    store = store or cgp.SignatureStore(b"k" * 32)
    request = translate(dict({"messages": [{"role": "user", "content": "hi"}]}, **(body or {})), model=model, store=store)
    return cgp.ResponseFold(request, store), store


def run_fold(fold, chunks):
    events = fold.start()
    for answer in chunks:
        events += fold.feed(answer)
    events += fold.finish()
    return events


def test_parts_become_blocks_in_order_with_usage():
    fold, _ = fold_for({"thinking": {"type": "adaptive"}})
    usage = {"promptTokenCount": 100, "cachedContentTokenCount": 40, "candidatesTokenCount": 7,
             "thoughtsTokenCount": 20, "toolUsePromptTokenCount": 15, "totalTokenCount": 142}
    run_fold(fold, [chunk(text("Plan.", thought=True), text("Hello"), call("Read", {"file_path": "/x"}),
                          finish="STOP", usage=usage)])
    message = fold.message()
    assert [b["type"] for b in message["content"]] == ["thinking", "text", "tool_use"]
    assert message["content"][0]["thinking"] == "Plan." and message["content"][1]["text"] == "Hello"
    assert message["content"][2]["input"] == {"file_path": "/x"}
    assert message["content"][2]["id"].startswith("toolu_")
    assert message["stop_reason"] == "tool_use"  # Gemini says STOP even when it called a tool
    # input = prompt - cached + tool-use prompt; output includes thinking, which is also shown alone
    assert message["usage"] == {"input_tokens": 75, "cache_creation_input_tokens": 0,
                                "cache_read_input_tokens": 40, "output_tokens": 27,
                                "output_tokens_details": {"thinking_tokens": 20}}


def test_input_estimate_is_the_same_for_stream_and_non_stream_forms():
    body = {"tools": TOOLS, "messages": [{"role": "user", "content": "hello " * 100}]}
    starts = [cgp.ResponseFold(translate(dict(body, stream=flag)), None).start()[0][1]["message"]["usage"]
              for flag in (True, False)]
    assert starts[0] == starts[1] and starts[0]["input_tokens"] > 150
    assert starts[0]["output_tokens_details"] == {"thinking_tokens": 0}


@pytest.mark.parametrize("finish,stop_reason", [
    ("STOP", "end_turn"), ("MAX_TOKENS", "max_tokens"), ("SAFETY", "refusal"),
    ("PROHIBITED_CONTENT", "refusal"), ("BLOCKLIST", "refusal"), ("SPII", "refusal"),
    ("RECITATION", "refusal"),
])
def test_finish_reasons_map_to_stop_reasons(finish, stop_reason):
    fold, _ = fold_for()
    run_fold(fold, [chunk(text("partial"), finish=finish)])
    assert fold.message()["stop_reason"] == stop_reason
    assert fold.message()["content"] == [{"type": "text", "text": "partial"}]


def test_blocked_prompt_is_a_refusal():
    fold, _ = fold_for()
    run_fold(fold, [{"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 5}}])
    assert fold.message()["stop_reason"] == "refusal" and fold.message()["content"] == []


def test_stop_sequence_is_enforced_and_reported():
    fold, _ = fold_for({"stop_sequences": ["HALT", "a2"]})
    run_fold(fold, [chunk(text("keep this HALT drop that"), finish="STOP")])
    message = fold.message()
    assert message["content"] == [{"type": "text", "text": "keep this "}]
    assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", "HALT")


def test_stop_sequence_split_across_chunks_holds_back_only_a_possible_start():
    fold, _ = fold_for({"stop_sequences": ["1", "2", "3", "4", "5", "<END>"]})
    fold.start()
    first = fold.feed(chunk(text("abc<E")))
    assert [e[1]["delta"]["text"] for e in first if e[0] == "content_block_delta"] == ["abc"]
    second = fold.feed(chunk(text("ND>tail"), finish="STOP"))
    assert fold.done and not any(e[0] == "content_block_delta" for e in second)
    fold.finish()
    assert fold.message()["content"][0]["text"] == "abc" and fold.message()["stop_sequence"] == "<END>"


def test_held_text_that_was_not_a_stop_sequence_is_released():
    fold, _ = fold_for({"stop_sequences": ["1", "2", "3", "4", "5", "<END>"]})
    run_fold(fold, [chunk(text("x <E")), chunk(text("h? no"), finish="STOP")])
    assert fold.message()["content"][0]["text"] == "x <Eh? no" and fold.message()["stop_reason"] == "end_turn"


def stream_cut(sequences, pieces):
    """Return (text, stop_sequence) the fold gives for text pieces, one chunk each."""
    fold, _ = fold_for({"stop_sequences": sequences})
    run_fold(fold, [chunk(text(piece)) for piece in pieces] + [chunk(finish="STOP")])
    message = fold.message()
    return "".join(b["text"] for b in message["content"] if b["type"] == "text"), \
        message["stop_sequence"]


def reference_cut(sequences, whole):
    """Cut where generation would have stopped: at the match that ends first."""
    ends = [(whole.find(s) + len(s), i, s) for i, s in enumerate(sequences) if s in whole]
    if not ends:
        return whole, None
    end, _, sequence = min(ends)
    return whole[:end - len(sequence)], sequence


def test_stop_sequences_cut_like_a_reference_whatever_the_chunking():
    rnd = random.Random(13)
    for _ in range(300):
        alphabet = rnd.choice(["ab", "abc", "abcd "])
        sequences = list({"".join(rnd.choice(alphabet) for _ in range(rnd.choice([1, 3, 9, 20])))
                          for _ in range(rnd.randint(1, 6))})
        whole = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 120)))
        pieces, at = [], 0
        while at < len(whole):
            step = rnd.randint(1, 30)
            pieces.append(whole[at:at + step])
            at += step
        assert stream_cut(sequences, pieces) == reference_cut(sequences, whole), (sequences, pieces)


def test_the_stop_sequence_that_ends_first_wins():
    assert stream_cut(["abc", "b"], ["xa", "bc"]) == ("xa", "b")
    assert stream_cut(["yy", "zzz"], ["zz", "zyy"]) == ("", "zzz")
    assert stream_cut(["bc", "abc"], ["xab", "c"]) == ("xa", "bc")  # same end: the first listed


def longest_held(sequences, text):
    """Return the length of text's longest tail that begins one of the sequences."""
    return max([n for n in range(1, len(text) + 1)
                if any(s.startswith(text[-n:]) for s in sequences)] or [0])


@pytest.mark.parametrize("nesting", [cgp.MAX_FAIL_NESTING, 0])  # 0: a letter at a time
def test_stop_sequence_matching_holds_back_exactly_the_longest_possible_start(nesting, monkeypatch):
    monkeypatch.setattr(cgp, "MAX_FAIL_NESTING", nesting)
    rnd = random.Random(29)
    for _ in range(400):
        alphabet = rnd.choice(["ab", "abc", "aab "])
        sequences = list({"".join(rnd.choice(alphabet) for _ in range(rnd.choice([1, 2, 5, 12, 40])))
                          for _ in range(rnd.randint(1, 5))})
        sequences.append("c" + sequences[0][:-1])  # its tails are the starts of another
        pieces = [rnd.choice(sequences)[:rnd.randint(0, 40)] if rnd.random() < 0.7 else
                  "".join(rnd.choice(alphabet + "z") for _ in range(rnd.randint(1, 6)))
                  for _ in range(rnd.randint(1, 8))]  # deep into the sequences, and out again
        whole = "".join(pieces)
        stops, held, released, at = cgp._StopSequences(tuple(sequences)), "", "", 0
        while at < len(whole):
            step = rnd.randint(1, 30)
            text, at = held + whole[at:at + step], at + step
            cut, matched = stops.scan(text, len(held))
            released, held = released + text[:cut], text[cut:]
            if matched:
                assert (released, matched) == reference_cut(sequences, whole[:at]), sequences
                break
            assert len(held) == longest_held(sequences, released + held), (sequences, whole)
        else:
            assert reference_cut(sequences, whole) == (whole, None)


def echoed_prefixes(sequences, size):
    """A text that follows each sequence for all but its last letter, then leaves it: every state
    of the automaton is reached."""
    whole = "".join(sequence[:-1] + "\n" for sequence in sequences) * (size // 1000 + 1)
    return whole[:size]


SHORT_WORDS = ["".join(random.Random(300 + i).choices("abcdefghij klmnop", k=4)) + "Q"
               for i in range(64)]
LONG_RANDOM = ["".join(random.Random(100 + i).choices("abcdefghij klmnop", k=1000))
               for i in range(64)]
# Each follows the one before for a while, then leaves it: working out one fail state needs the
# one before, 63 deep.
NESTED_LEAVERS = [LONG_RANDOM[0]]
for _i in range(63):
    NESTED_LEAVERS.append(chr(0x500 + _i) + NESTED_LEAVERS[-1][:15 * _i + 20] + "Z"
                          + LONG_RANDOM[_i + 1][:978 - 15 * _i])
# Each one letter and the one before it: the longest tail of one is the start of the next.
SHIFTED_COPIES = list(itertools.accumulate(
    [chr(0x400 + i) for i in range(63)], lambda previous, letter: letter + previous[:999],
    initial=LONG_RANDOM[0]))


@pytest.mark.parametrize("sequences,answer,budget", [
    (LONG_RANDOM, None, 0.05),
    (SHORT_WORDS, None, 0.05),
    (["x" * 999 + chr(0x100 + i) for i in range(64)], "x" * 240_000, 0.05),
    (["a" * 500 + "b" + chr(0x100 + i) * 499 for i in range(64)], "a" * 240_000, 0.05),
    (["ab" * 499 + "c" + chr(0x100 + i) for i in range(64)], "ab" * 120_000, 0.05),
    (LONG_RANDOM, echoed_prefixes(LONG_RANDOM, 240_000), 0.05),
    (SHIFTED_COPIES, echoed_prefixes(SHIFTED_COPIES[::-1], 240_000), 0.05),
    (NESTED_LEAVERS, echoed_prefixes(NESTED_LEAVERS[::-1], 240_000), 0.05),
], ids=["random", "short-words", "x-run", "a-run", "ab-run", "echoed", "echoed-shifted-copies",
        "echoed-nested-leavers"])
def test_stop_sequence_matching_stays_fast_at_the_limits(sequences, answer, budget):
    answer = answer or "".join(random.Random(5).choices("abcdefghij klmnop", k=240_000))
    pieces = [answer[at:at + 100] for at in range(0, len(answer), 100)]
    plain = min(fold_seconds((), pieces)[0] for _ in range(3))  # the least noisy of three
    spent, message = min((fold_seconds(sequences, pieces) for _ in range(3)), key=lambda r: r[0])
    assert message["stop_reason"] == "end_turn" and message["content"][0]["text"] == answer
    assert spent - plain < budget  # 64 sequences of 1,000 characters, 240 KB in 2,400 chunks


def fold_seconds(sequences, pieces):
    """Return (thread CPU seconds, message) of folding one text chunk per piece."""
    fold, _ = fold_for({"stop_sequences": list(sequences)} if sequences else {})
    chunks = [chunk(text(piece)) for piece in pieces] + [chunk(finish="STOP")]
    started = time.thread_time()
    run_fold(fold, chunks)
    return time.thread_time() - started, fold.message()


def test_malformed_function_call_after_text_ends_honestly():
    fold, _ = fold_for()
    run_fold(fold, [chunk(text("Let me call it."), finish="MALFORMED_FUNCTION_CALL")])
    message = fold.message()
    assert message["stop_reason"] == "end_turn" and "MALFORMED_FUNCTION_CALL" in message["content"][0]["text"]


def test_thinking_is_not_shown_to_clients_that_did_not_ask():
    fold, _ = fold_for()
    run_fold(fold, [chunk(text("secret plan", thought=True), text("Answer"), finish="STOP")])
    assert fold.message()["content"] == [{"type": "text", "text": "Answer"}]


def test_display_omitted_gives_thinking_blocks_with_signature_and_no_text():
    fold, store = fold_for({"thinking": {"type": "adaptive", "display": "omitted"}})
    signature = new_signature()
    run_fold(fold, [chunk(text("private", thought=True, thoughtSignature=signature), text("Hi"), finish="STOP")])
    thinking = fold.message()["content"][0]
    assert thinking["type"] == "thinking" and thinking["thinking"] == ""
    assert store.resolve(thinking["signature"]).signature == signature


def test_text_signature_never_becomes_a_block_after_the_text(gemini, proxy):
    signature = new_signature()
    gemini.script = [Reply(chunk(text("Let me think", thought=True)), chunk(text("Answer")),
                           chunk(text("", thoughtSignature=signature), finish="STOP"))]
    body = messages_body(thinking={"type": "adaptive"})
    _, message = stream(proxy, body)
    assert [b["type"] for b in message["content"]] == ["thinking", "text"]  # Claude Code shows the last block
    body["messages"] += [{"role": "assistant", "content": message["content"]}, {"role": "user", "content": "more"}]
    assert post(proxy, body).status == 200
    # Not replayed: the bytes of a text part depend only on what the client sent back.
    assert gemini.bodies[-1]["contents"][1]["parts"] == [{"text": "Answer"}]


def test_tool_ids_carry_gemini_call_id_and_signature_and_are_unique():
    fold, store = fold_for()
    signature = new_signature()
    run_fold(fold, [chunk(call("Read", {}, call_id="c1", signature=signature), call("Read", {}, call_id="c1"),
                          call("Bash", {}), finish="STOP")])
    ids = [b["id"] for b in fold.message()["content"]]
    assert len(set(ids)) == 3 and all(cgp.re.match(r"^toolu_[A-Za-z0-9_-]+$", i) for i in ids)
    first = cgp._decode_carrier(store.key, ids[0][6:])
    assert (first.call_id, first.signature, first.model) == ("c1", signature, "gemini-3.5-flash")
    assert cgp._decode_carrier(store.key, ids[1][6:]).signature == ""


def test_stream_events_concatenate_to_the_non_stream_message():
    chunks = [chunk(text("Thinking about it", thought=True)), chunk(text("", thought=True, thoughtSignature=new_signature())),
              chunk(text("Hello ")), chunk(text("world")),
              chunk(call("Read", {"file_path": "/x", "n": [1, 2]}, call_id="c9"), finish="STOP")]
    body = {"thinking": {"type": "adaptive"}}
    fold, _ = fold_for(body)
    events = run_fold(fold, chunks)
    raw = b"".join(cgp._sse_frame(name, data) for name, data in events)
    _, rebuilt = read_sse(raw)
    whole, _ = fold_for(body)
    run_fold(whole, [merge_chunks(chunks)])
    expected = whole.message()
    for block, other in zip(rebuilt["content"], expected["content"]):
        if block["type"] == "tool_use":
            block["id"] = other["id"]  # ids are minted per answer
        if block["type"] == "thinking":
            block["signature"] = other["signature"]
    assert rebuilt["content"] == expected["content"]
    assert rebuilt["stop_reason"] == expected["stop_reason"] == "tool_use"


def test_web_search_grounding_becomes_server_tool_blocks():
    body = {"tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 8}],
            "tool_choice": {"type": "tool", "name": "web_search"}}
    fold, _ = fold_for(body)
    grounding = {"webSearchQueries": ["capital of France"],
                 "groundingChunks": [{"web": {"uri": "https://example.com/paris", "title": "Paris"}}]}
    run_fold(fold, [chunk(text("Paris."), finish="STOP", grounding=grounding)])
    message = fold.message()
    assert [b["type"] for b in message["content"]] == ["server_tool_use", "web_search_tool_result", "text"]
    use, result = message["content"][:2]
    assert use["name"] == "web_search" and use["input"] == {"query": "capital of France"}
    assert cgp.re.match(r"^srvtoolu_[a-zA-Z0-9_]+$", use["id"]) and result["tool_use_id"] == use["id"]
    assert result["content"][0]["url"] == "https://example.com/paris"
    assert message["usage"]["server_tool_use"] == {"web_search_requests": 1, "web_fetch_requests": 0}


# -- Server tools Gemini runs -------------------------------------------------
# Anthropic shapes: anthropic 2.x types/web_fetch_tool_result_block.py, web_fetch_block.py,
# code_execution_tool_result_block.py, code_execution_result_block.py, server_tool_usage.py.
# Gemini shapes: urlContextMetadata.urlMetadata[{retrievedUrl, urlRetrievalStatus}],
# executableCode{language, code}, codeExecutionResult{outcome, output}.

WEB_FETCH_TOOL = {"type": "web_fetch_20250910", "name": "web_fetch", "max_uses": 3,
                  "allowed_domains": ["example.com"], "blocked_domains": ["evil.example"]}
CODE_TOOL = {"type": "code_execution_20250825", "name": "code_execution"}


def answer_message(proxy, body, streamed):
    """Return the Message the client gets, from the JSON body or rebuilt from the stream."""
    if streamed:
        events, message = stream(proxy, body)
        return message, events
    answer = post(proxy, body)
    assert answer.status == 200, answer.raw
    return answer.json, None


@pytest.mark.parametrize("streamed", [False, True])
def test_web_fetch_runs_as_url_context_and_returns_fetch_blocks(gemini, proxy, streamed):
    grounding = {"groundingChunks": [{"web": {"uri": "https://example.com/a", "title": "Page A"}}]}
    gemini.script = [Reply(chunk(text("A is about apples; B could not be read.")),
                           chunk(text(""), finish="STOP", grounding=grounding, url_context=[
                               {"retrievedUrl": "https://example.com/a", "urlRetrievalStatus": "URL_RETRIEVAL_STATUS_SUCCESS"},
                               {"retrievedUrl": "https://example.com/b", "urlRetrievalStatus": "URL_RETRIEVAL_STATUS_ERROR"}]))]
    body = messages_body("Summarize https://example.com/a and https://example.com/b", tools=[WEB_FETCH_TOOL])
    message, _ = answer_message(proxy, body, streamed)
    method, path, _, sent = gemini.requests[-1]
    assert path.endswith(":generateContent")  # read whole: the fetch blocks go before the text
    assert sent["tools"] == [{"urlContext": {}}] and "toolConfig" not in sent
    prompt = sent["systemInstruction"]["parts"][-1]["text"]
    assert "URL context" in prompt and "example.com" in prompt and "evil.example" in prompt
    kinds = [b["type"] for b in message["content"]]
    assert kinds == ["server_tool_use", "web_fetch_tool_result"] * 2 + ["text"]
    use_a, result_a, use_b, result_b, answer_text = message["content"]
    assert use_a["name"] == "web_fetch" and use_a["input"] == {"url": "https://example.com/a"}
    assert result_a["tool_use_id"] == use_a["id"] and use_a["id"].startswith("srvtoolu_")
    assert result_a["content"] == {
        "type": "web_fetch_result", "url": "https://example.com/a", "retrieved_at": None,
        "content": {"type": "document", "title": "Page A", "citations": None,
                    "source": {"type": "text", "media_type": "text/plain", "data": ""}}}
    assert use_b["input"] == {"url": "https://example.com/b"} and result_b["tool_use_id"] == use_b["id"]
    assert result_b["content"] == {"type": "web_fetch_tool_result_error", "error_code": "url_not_accessible"}
    assert answer_text["text"] == "A is about apples; B could not be read."
    assert message["usage"]["server_tool_use"] == {"web_search_requests": 0, "web_fetch_requests": 2}


@pytest.mark.parametrize("streamed", [False, True])
def test_code_execution_parts_become_code_execution_blocks(gemini, proxy, streamed):
    gemini.script = [Reply(
        chunk(text("Let me compute.")),
        chunk({"executableCode": {"language": "PYTHON", "code": "print(6 * 7)"}}),
        chunk({"codeExecutionResult": {"outcome": "OUTCOME_OK", "output": "42\n"}}),
        chunk({"executableCode": {"language": "PYTHON", "code": "1/0"}},
              {"codeExecutionResult": {"outcome": "OUTCOME_FAILED", "output": "ZeroDivisionError"}}),
        chunk({"executableCode": {"language": "PYTHON", "code": "while True: pass"}},
              {"codeExecutionResult": {"outcome": "OUTCOME_DEADLINE_EXCEEDED"}}),
        chunk(text("6 * 7 = 42."), finish="STOP"))]
    body = messages_body("What is 6*7? Run code.", tools=[CODE_TOOL])
    message, events = answer_message(proxy, body, streamed)
    sent = gemini.bodies[-1]
    assert sent["tools"] == [{"codeExecution": {}}] and "toolConfig" not in sent
    if streamed:  # code blocks do not wait for the end: relayed live
        assert gemini.requests[-1][1].endswith(":streamGenerateContent?alt=sse")
    kinds = [b["type"] for b in message["content"]]
    assert kinds == ["text"] + ["server_tool_use", "code_execution_tool_result"] * 3 + ["text"]
    uses, results = message["content"][1:7:2], message["content"][2:7:2]
    assert [u["input"] for u in uses] == [{"code": "print(6 * 7)"}, {"code": "1/0"}, {"code": "while True: pass"}]
    assert all(u["name"] == "code_execution" for u in uses)
    assert [r["tool_use_id"] for r in results] == [u["id"] for u in uses]
    assert results[0]["content"] == {"type": "code_execution_result", "stdout": "42\n", "stderr": "",
                                     "return_code": 0, "content": []}
    assert results[1]["content"] == {"type": "code_execution_result", "stdout": "", "stderr": "ZeroDivisionError",
                                     "return_code": 1, "content": []}
    assert results[2]["content"] == {"type": "code_execution_tool_result_error",
                                     "error_code": "execution_time_exceeded"}
    assert message["content"][-1]["text"] == "6 * 7 = 42." and message["stop_reason"] == "end_turn"


def test_builtin_tools_join_function_tools_on_gemini_3_and_give_way_on_2x(gemini, proxy):
    tools = [WEB_FETCH_TOOL, CODE_TOOL, {"name": "Read", "input_schema": {"type": "object"}}]
    gemini.script = [Reply(chunk({"toolCall": {"toolType": "URL_CONTEXT", "id": "t1"}},
                                 {"toolResponse": {"toolType": "URL_CONTEXT", "id": "t1"}},
                                 call("Read", {"path": "a.txt"}), finish="STOP"))]
    answer = post(proxy, messages_body("Fetch https://example.com then read a.txt", model="gemini-3.5-flash",
                                       tools=tools))
    assert answer.status == 200, answer.raw
    sent = gemini.bodies[-1]
    assert sent["tools"] == [{"functionDeclarations": [{"name": "Read", "description": "",
                                                        "parametersJsonSchema": {"type": "object"}}]},
                             {"urlContext": {}}, {"codeExecution": {}}]
    assert sent["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"},
                                  "includeServerSideToolInvocations": True}
    assert [b["type"] for b in answer.json["content"]] == ["tool_use"]  # built-in records are not blocks
    older = post(proxy, messages_body("Fetch https://example.com then read a.txt", model="gemini-2.5-flash",
                                      tools=tools))
    assert older.status == 200, older.raw  # Gemini 2.x cannot combine: the client's functions win
    assert gemini.bodies[-1]["tools"] == [sent["tools"][0]] and "include" not in json.dumps(gemini.bodies[-1])
    forced = post(proxy, messages_body("Fetch it", model="gemini-2.5-flash", tools=tools,
                                       tool_choice={"type": "tool", "name": "web_fetch"}))
    assert forced.status == 200 and gemini.bodies[-1]["tools"] == [{"urlContext": {}}]


def test_unrelayable_parts_leave_a_note_and_a_debug_line(gemini, proxy, caplog):
    caplog.set_level("DEBUG", logger="claude_gemini_proxy")
    image = base64.b64encode(b"\x89PNG" + b"x" * 4000).decode()
    gemini.script = [Reply(chunk(text("Here is the chart."), {"inlineData": {"mimeType": "image/png", "data": image}},
                                 {"functionResponse": {"name": "lookup", "response": {"ok": True}}},
                                 finish="STOP"))]
    answer = post(proxy, messages_body("Plot it"))
    assert answer.status == 200, answer.raw
    assert [b["type"] for b in answer.json["content"]] == ["text"]
    assert answer.json["content"][0]["text"] == (
        "Here is the chart.\n\n[proxy: Gemini produced a file (image/png, 3 KB), which cannot be relayed here.]"
        "\n\n[proxy: Gemini produced a function response for lookup, which cannot be relayed here.]")
    assert image not in answer.raw.decode()
    logged = [r.getMessage() for r in caplog.records if r.levelname == "DEBUG"]
    assert any("image/png" in line for line in logged) and any("function response for lookup" in line
                                                               for line in logged)
    assert "contents" in gemini.bodies[-1]


# -- Citations ----------------------------------------------------------------
# Anthropic: types/citations_web_search_result_location.py, citations_delta.py; Gemini:
# groundingMetadata.groundingSupports[{segment{startIndex, endIndex, text}, groundingChunkIndices}].

@pytest.mark.parametrize("streamed", [False, True])
def test_grounding_supports_become_citations_and_every_query_shows(gemini, proxy, streamed):
    answer_text = "Paris is the capital of France. It has about two million people."
    grounding = {
        "webSearchQueries": ["capital of France", "population of Paris"],
        "groundingChunks": [{"web": {"uri": "https://example.com/paris", "title": "Paris - Example"}},
                            {"web": {"uri": "https://example.org/stats", "title": "Stats"}}],
        "groundingSupports": [
            {"segment": {"startIndex": 0, "endIndex": 31, "text": "Paris is the capital of France."},
             "groundingChunkIndices": [0, 1]},
            {"segment": {"startIndex": 32, "endIndex": 65, "text": "It has about two million people."},
             "groundingChunkIndices": [1, 7]}]}  # an index past the chunks is skipped
    gemini.script = [Reply(chunk(text(answer_text[:20])), chunk(text(answer_text[20:]), finish="STOP",
                                                                grounding=grounding))]
    body = messages_body("Tell me about Paris.", tools=[{"type": "web_search_20250305", "name": "web_search"}])
    message, events = answer_message(proxy, body, streamed)
    assert gemini.bodies[-1]["tools"] == [{"googleSearch": {}}]
    kinds = [b["type"] for b in message["content"]]
    assert kinds == ["server_tool_use", "web_search_tool_result"] * 2 + ["text"]
    assert [b["input"] for b in message["content"][0:4:2]] == [{"query": "capital of France"},
                                                               {"query": "population of Paris"}]
    assert len(message["content"][1]["content"]) == 2 and message["content"][3]["content"] == []
    cited = message["content"][-1]
    assert cited["text"] == answer_text  # the text itself is unchanged
    expected = [("Paris is the capital of France.", "https://example.com/paris", "Paris - Example"),
                ("Paris is the capital of France.", "https://example.org/stats", "Stats"),
                ("It has about two million people.", "https://example.org/stats", "Stats")]
    assert len(cited["citations"]) == len(expected)
    for citation, (cited_text, url, title) in zip(cited["citations"], expected):
        assert citation == {"type": "web_search_result_location", "url": url, "title": title,
                            "cited_text": cited_text, "encrypted_index": ""}
    assert message["usage"]["server_tool_use"] == {"web_search_requests": 2, "web_fetch_requests": 0}
    if streamed:
        deltas = [e for e in events if e["type"] == "content_block_delta" and e["delta"]["type"] == "citations_delta"]
        assert len(deltas) == 3 and all(e["index"] == 4 for e in deltas)


# -- Gemini answers: odd, empty, oversized, slow ------------------------------
# Whatever Gemini sends becomes a faithful translation or the mapped error.

ODD_CHUNKS = {
    "text-number": {"candidates": [{"content": {"parts": [{"text": 5}]}}]},
    "candidates-object": {"candidates": {"content": {}}},
    "content-list": {"candidates": [{"content": [{"text": "x"}]}]},
    "parts-number": {"candidates": [{"content": {"parts": 3}}]},
    "usage-strings": dict(chunk(text("x"), finish="STOP"), usageMetadata={"promptTokenCount": "10"}),
    "call-string": {"candidates": [{"content": {"parts": [{"functionCall": "Read()"}]}}]},
    "finish-list": {"candidates": [{"content": {"parts": [{"text": "x"}]}, "finishReason": ["STOP"]}]},
    "signature-number": {"candidates": [{"content": {"parts": [{"text": "x", "thoughtSignature": 5}]}}]},
    "error-code-string": {"error": {"code": "429", "message": "slow"}},
    "not-an-object": ["x"],
}


@pytest.mark.parametrize("name", sorted(ODD_CHUNKS))
def test_odd_chunk_types_are_502_before_the_stream_and_an_sse_error_in_it(gemini, proxy, name):
    gemini.script = [Reply(ODD_CHUNKS[name], verbatim=True),
                     Reply(chunk(text("x")), ODD_CHUNKS[name], verbatim=True)]
    answer = post(proxy, messages_body())
    assert answer.status == 502 and answer.json["error"]["type"] == "api_error", answer.raw
    events, _ = stream(proxy, messages_body())
    assert events[-1]["type"] == "error" and events[-1]["error"]["type"] == "api_error"
    assert post(proxy, messages_body()).status == 200


def test_a_redirect_is_a_502_and_never_followed(gemini, proxy):
    gemini.script = [Reply(status=302, error=gemini_error(302, "moved", "MOVED"))]
    answer = post(proxy, messages_body())
    assert answer.status == 502 and "redirected" in answer.json["error"]["message"]
    assert len(gemini.bodies) == 1


@pytest.mark.parametrize("reason,stop_reason", [
    ("LANGUAGE", "refusal"), ("IMAGE_SAFETY", "refusal"), ("TOO_MANY_TOOL_CALLS", "end_turn"),
    ("CONTINUATION", "max_tokens"), ("ESCALATION", "refusal"), ("MODEL_ARMOR", "refusal"),
    ("SOMETHING_NEW", "end_turn"),
])
def test_every_finish_reason_has_a_row_and_an_unknown_one_is_end_turn(reason, stop_reason):
    fold, _ = fold_for()
    run_fold(fold, [chunk(text("partial"), finish=reason)])
    assert fold.message()["stop_reason"] == stop_reason


def test_missing_thought_signature_finish_is_a_400_saying_what_was_missing(gemini, proxy):
    gemini.script = [Reply(chunk(finish="MISSING_THOUGHT_SIGNATURE"))]
    answer = post(proxy, messages_body())
    assert answer.status == 400 and "thought signature" in answer.json["error"]["message"]


@pytest.mark.parametrize("count_status,expected", [(200, "counted"), (404, "estimated")])
def test_overflow_without_a_count_gets_one_from_count_tokens_or_an_estimate(gemini, proxy,
                                                                            count_status, expected):
    gemini.count_tokens_status = count_status
    gemini.script = [Reply(status=400, error=gemini_error(
        400, "The input token count exceeds the maximum number of tokens allowed 1048576."))]
    answer = post(proxy, messages_body())
    assert answer.status == 400
    tokens = int(re.match(r"prompt is too long: (\d+) tokens > 1048576 maximum$",
                          answer.json["error"]["message"]).group(1))
    generate = next(b for m, p, _, b in gemini.requests if ":generateContent" in p)
    if expected == "counted":
        counted = next(b for m, p, _, b in gemini.requests if ":countTokens" in p)
        assert counted["generateContentRequest"]["contents"] == generate["contents"]
        assert tokens == len(json.dumps(counted)) // 4
    else:
        assert tokens == len(json.dumps(generate, separators=(",", ":"), ensure_ascii=False)) // 4


def test_an_empty_answer_after_streamed_thinking_is_retried_and_the_message_goes_on(gemini, proxy):
    gemini.script = [Reply(chunk(text("Let me plan.", thought=True)), chunk(finish="MALFORMED_FUNCTION_CALL")),
                     Reply(chunk(call("Read", {"file_path": "/a"}), finish="STOP"))]
    events, message = stream(proxy, messages_body(thinking={"type": "adaptive"},
                                                  tools=[{"name": "Read", "input_schema": {"type": "object"}}]))
    assert [b["type"] for b in message["content"]] == ["thinking", "tool_use"]
    assert message["content"][0]["thinking"] == "Let me plan." and message["stop_reason"] == "tool_use"
    assert len(gemini.bodies) == 2


@pytest.mark.parametrize("streamed", [False, True])
def test_still_empty_after_the_retry_is_an_api_error_naming_the_reason(gemini, proxy, streamed):
    empty = chunk(finish="STOP")
    empty["candidates"][0]["finishMessage"] = "Model produced nothing."
    gemini.script = [Reply(empty), Reply(empty)]
    if streamed:
        events, _ = stream(proxy, messages_body())
        error = events[-1]["error"]
    else:
        answer = post(proxy, messages_body())
        assert answer.status == 502 and answer.headers["x-should-retry"] == "true"
        error = answer.json["error"]
    assert error["type"] == "api_error" and "STOP" in error["message"]
    assert "Model produced nothing." in error["message"] and len(gemini.bodies) == 2


def test_vertex_partial_args_become_one_tool_use_with_the_whole_input():
    fold, _ = fold_for({"tools": [{"name": "Edit", "input_schema": {"type": "object"}}]})
    pieces = [
        {"functionCall": {"name": "Edit", "id": "c1", "willContinue": True, "partialArgs": [
            {"jsonPath": "$.path", "stringValue": "/a.py"},
            {"jsonPath": "$.edits[0].text", "stringValue": "def f(", "willContinue": True}]},
         "thoughtSignature": new_signature()},
        {"functionCall": {"name": "", "willContinue": True, "partialArgs": [
            {"jsonPath": "$.edits[0].text", "stringValue": "): pass"},
            {"jsonPath": "$.edits[0].line", "numberValue": 3}]}},
        {"functionCall": {"partialArgs": [{"jsonPath": "$.dry", "boolValue": False}]}},
        {"functionCall": {"name": "", "args": {}}},  # never a tool_use without a name
    ]
    events = run_fold(fold, [chunk(piece) for piece in pieces] + [chunk(finish="STOP")])
    message = fold.message()
    assert [b["type"] for b in message["content"]] == ["tool_use"]
    assert message["content"][0]["name"] == "Edit" and message["stop_reason"] == "tool_use"
    assert message["content"][0]["input"] == {"path": "/a.py", "dry": False,
                                              "edits": [{"text": "def f(): pass", "line": 3}]}
    _, rebuilt = read_sse(b"".join(cgp._sse_frame(name, data) for name, data in events))
    assert rebuilt["content"][0]["input"] == message["content"][0]["input"]


def test_a_stream_fold_keeps_no_text_the_final_message_does_not_need():
    fold, _ = fold_for({"stream": True, "thinking": {"type": "adaptive"}})
    run_fold(fold, [chunk(text("t" * 1000, thought=True))] + [chunk(text("x" * 1000))] * 50
             + [chunk(finish="STOP")])
    assert fold.pieces == [] and all(len(json.dumps(b)) < 100 for b in fold.blocks)


def test_a_model_that_cannot_combine_tools_gets_the_functions_alone_from_then_on(gemini, proxy, caplog):
    caplog.set_level("WARNING", logger="claude_gemini_proxy")
    gemini.uncombinable.add("gemini-3.1-flash-lite")
    body = messages_body("Fetch and read", model="gemini-3.1-flash-lite",
                         tools=[WEB_FETCH_TOOL, {"name": "Read", "input_schema": {"type": "object"}}])
    answer = post(proxy, body)
    assert answer.status == 200, answer.raw
    first, retried = gemini.bodies[-2:]
    assert [list(t) for t in first["tools"]] == [["functionDeclarations"], ["urlContext"]]
    assert [list(t) for t in retried["tools"]] == [["functionDeclarations"]]
    assert "includeServerSideToolInvocations" not in retried["toolConfig"]
    assert any("built-in tools next to function declarations" in r.getMessage() for r in caplog.records)
    again = post(proxy, body)  # learnt: one call
    assert again.status == 200 and len(gemini.bodies) == 3
    assert [list(t) for t in gemini.bodies[-1]["tools"]] == [["functionDeclarations"]]


class ScriptedUpstream:
    """A raw HTTP upstream: respond(sock, n) answers request n (from 1) with whatever bytes."""

    def __init__(self, respond):
        self.respond, self.calls, self.lock = respond, 0, threading.Lock()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.base = f"http://127.0.0.1:{self.listener.getsockname()[1]}/v1beta"
        threading.Thread(target=accept_forever, args=(self.listener, self._serve), daemon=True).start()

    def _serve(self, sock):
        data = b""
        while b"\r\n\r\n" not in data:
            piece = sock.recv(65536)
            if not piece:
                return
            data += piece
        head, body = data.split(b"\r\n\r\n", 1)
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        while len(body) < length:
            body += sock.recv(65536)
        with self.lock:
            self.calls += 1
            n = self.calls
        try:
            self.respond(sock, n)
        except OSError:
            pass
        finally:
            sock.close()

    def close(self):
        self.listener.close()


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def sse_piece(data):
    return b"%x\r\n%s\r\n" % (len(data), data)


@pytest.fixture
def scripted(start_proxy):
    made = []

    def make(respond, **config):
        upstream = ScriptedUpstream(respond)
        made.append(upstream)
        return start_proxy(cgp.Config(**dict(dict(host="127.0.0.1", port=0, api_keys=("k",),
                                                    api_base=upstream.base, max_retries=0,
                                                    signature_key=b"k" * 32), **config))), upstream
    yield make
    for upstream in made:
        upstream.close()


def test_upstream_timeout_counts_between_chunks_not_comment_lines(scripted):
    def respond(sock, n):
        sock.sendall(SSE_HEAD + sse_piece(b"data: " + json.dumps(chunk(text("hi"))).encode() + b"\n\n"))
        for _ in range(100):  # comments every 50 ms for 5 s: they must not keep the stream open
            sock.sendall(sse_piece(b": keep-alive\n\n"))
            time.sleep(0.05)
    proxy, _ = scripted(respond, upstream_timeout=0.4)
    started = time.monotonic()
    events, _ = stream(proxy, messages_body())
    assert events[-1]["type"] == "error" and events[-1]["error"]["type"] == "timeout_error"
    assert time.monotonic() - started < 2.0


CLOSE_DELIMITED_SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"


def test_a_close_delimited_upstream_stream_is_relayed_and_cut_when_the_client_leaves(scripted):
    release = threading.Event()

    def respond(sock, n):
        sock.sendall(CLOSE_DELIMITED_SSE_HEAD + b"data: " + json.dumps(chunk(text("one "))).encode()
                     + b"\r\n\r\n")
        if n == 2:
            release.wait(5)  # a slow answer: only a cut read ends the proxy's wait early
        sock.sendall(b"data: " + json.dumps(chunk(text("two"), finish="STOP")).encode() + b"\r\n\r\n")
    proxy, _ = scripted(respond, ping_interval=0.2)
    events, message = stream(proxy, messages_body())
    assert message["content"][0]["text"] == "one two"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        payload = json.dumps(dict(messages_body(), stream=True)).encode()
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(payload), payload))
        assert b"one " in read_until(sock, lambda got: b"one " in got)
    started = time.monotonic()
    assert wait_for(lambda: proxy.server.active_requests == 0, 3)
    assert time.monotonic() - started < 1.0 and not release.is_set()
    release.set()


def test_a_body_dripped_a_byte_at_a_time_does_not_extend_the_timeout(scripted):
    def respond(sock, n):
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
        for byte in b" " * 100:
            sock.sendall(bytes([byte]))
            time.sleep(0.05)
    proxy, _ = scripted(respond, upstream_timeout=0.4)
    started = time.monotonic()
    answer = post(proxy, messages_body())
    assert answer.status == 504 and time.monotonic() - started < 2.0


def test_an_sse_line_over_16_mib_is_a_502(scripted):
    def respond(sock, n):
        sock.sendall(SSE_HEAD + sse_piece(b"data: " + json.dumps(chunk(text("hi"))).encode() + b"\n\n"))
        piece = b"x" * (1 << 20)
        for _ in range(17):
            sock.sendall(sse_piece(piece))
    proxy, _ = scripted(respond)
    events, _ = stream(proxy, messages_body())
    assert events[-1]["type"] == "error" and "16 MiB" in events[-1]["error"]["message"]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_non_stream_answer_over_64_mib_is_a_502(scripted, framing):
    def respond(sock, n):
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        if framing == "chunked":
            sock.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n")
            for _ in range(70):
                sock.sendall(sse_piece(b" " * (1 << 20)))
        else:  # refused from its Content-Length, nothing read
            sock.sendall(head + b"Content-Length: %d\r\n\r\n" % (70 << 20))
    proxy, _ = scripted(respond)
    answer = post(proxy, messages_body())
    assert answer.status == 502 and "64 MiB" in answer.json["error"]["message"]


def metric_count(proxy, status):
    text_metrics = request(proxy, "GET", "/metrics").raw.decode()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text_metrics.splitlines()
               if line.startswith("claude_gemini_proxy_requests_total{") and f'status="{status}"' in line)


def leave_after(proxy, body, marker, seen_by=None):
    """Send a request, read until `marker` arrives (or nothing is asked for), then hang up;
    note in seen_by whether the marker came. Never spins: a closed or silent socket ends it."""
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        seen = read_until(sock, lambda got: not marker or marker in got, deadline=10)
    if seen_by is not None:
        seen_by.append(bool(marker) and marker in seen)


def wait_idle(proxy, seconds=3.0):
    deadline = time.monotonic() + seconds
    while proxy.server.active_requests and time.monotonic() < deadline:
        time.sleep(0.02)
    return proxy.server.active_requests == 0


def test_clients_that_leave_mid_thinking_cost_one_upstream_call_each(gemini, start_proxy):
    proxy = start_proxy(make_config(gemini, ping_interval=0.2))
    clients, seen_by = 10, []
    gemini.script = [Reply(chunk(text("Thinking hard", thought=True)), chunk(text("answer"), finish="STOP"),
                           hold_after=1) for _ in range(clients)]
    body = dict(messages_body(thinking={"type": "adaptive"}), stream=True)
    threads = [threading.Thread(target=leave_after, args=(proxy, body, b"thinking_delta", seen_by),
                                daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    left = seen_by.count(True)  # clients that left mid-thinking (a loaded machine may refuse one)
    assert len(seen_by) == clients and left >= clients // 2
    assert wait_idle(proxy)
    gemini.hold.set()
    assert len(gemini.bodies) == left  # never retried, never counted as an empty answer
    assert metric_count(proxy, 499) == left
    assert post(proxy, messages_body()).status == 200


def test_a_non_stream_client_that_leaves_has_its_upstream_call_cancelled(gemini, start_proxy, caplog):
    caplog.set_level("INFO", logger="claude_gemini_proxy")
    proxy = start_proxy(make_config(gemini, ping_interval=0.2))
    gemini.script = [Reply(chunk(text("slow"), finish="STOP"), before=5.0)]
    leave_after(proxy, messages_body(), None)
    deadline = time.monotonic() + 2
    while not gemini.bodies and time.monotonic() < deadline:  # Gemini is working on it
        time.sleep(0.01)
    started = time.monotonic()
    assert wait_idle(proxy, 2.0) and time.monotonic() - started < 1.5
    assert metric_count(proxy, 499) == 1 and " 499 " in caplog.text
    assert len(gemini.bodies) == 1


def test_fuzzed_gemini_chunks_are_translated_or_the_mapped_error():
    rnd = random.Random(1414)
    grounding = {"webSearchQueries": ["q"], "groundingChunks": [{"web": {"uri": "https://x", "title": "X"}}],
                 "groundingSupports": [{"segment": {"text": "Hi"}, "groundingChunkIndices": [0]}]}
    fetched = [{"retrievedUrl": "https://x", "urlRetrievalStatus": "URL_RETRIEVAL_STATUS_SUCCESS"}]
    answers = [
        [chunk(text("plan", thought=True, thoughtSignature=new_signature())), chunk(text("Hi there")),
         chunk(call("Read", {"file_path": "/a"}, call_id="c1", signature=new_signature()), finish="STOP")],
        [chunk(text("Hi"), finish="STOP", grounding=grounding, url_context=fetched)],
        [chunk({"executableCode": {"language": "PYTHON", "code": "print(1)"}},
               {"codeExecutionResult": {"outcome": "OUTCOME_OK", "output": "1"}}, text("done"), finish="STOP")],
        [{"promptFeedback": {"blockReason": "SAFETY"}}],
        [{"error": {"code": 429, "message": "slow", "status": "RESOURCE_EXHAUSTED"}}],
    ]
    bodies = [{"thinking": {"type": "adaptive"}, "stop_sequences": ["ZZZ"],
               "tools": [{"name": "Read", "input_schema": {"type": "object"}}]},
              {"tools": [{"type": "web_search_20250305", "name": "web_search"}, WEB_FETCH_TOOL]},
              {"tools": [CODE_TOOL], "stream": True}]
    outcomes = {"ok": 0, "error": 0}
    for _ in range(2000):
        raw = [json.dumps(mutate(piece, rnd)).encode() for piece in rnd.choice(answers)]
        fold, _ = fold_for(rnd.choice(bodies))
        try:
            events = run_fold(fold, [cgp._parse_chunk(piece, "a chunk") for piece in raw])
            b"".join(cgp._sse_frame(name, data) for name, data in events)  # what the client gets
            json.dumps(fold.message(), ensure_ascii=False).encode()
            outcomes["ok"] += 1
        except cgp.ProxyError as error:
            assert error.error_type and error.message
            outcomes["error"] += 1
    assert outcomes["ok"] > 200 and outcomes["error"] > 200, outcomes


def test_a_pooled_connection_gets_its_full_timeout_back(gemini, start_proxy):
    proxy = start_proxy(make_config(gemini, upstream_timeout=5.0))
    gemini.script = [Reply(chunk(text("slow start")), chunk(text(" end"), finish="STOP"), before=0.5)]
    assert stream(proxy, messages_body())[1]["content"][0]["text"] == "slow start end"
    idle = proxy.server.upstream._idle
    assert len(idle) == 1 and idle[0].sock.gettimeout() == 5.0

# == Operators: metrics, token command, request ids ==========================

def test_metrics_count_a_known_mix_of_requests(gemini, proxy):
    usage = {"promptTokenCount": 50, "cachedContentTokenCount": 20, "candidatesTokenCount": 7}
    gemini.script = [Reply(chunk(text("a"), finish="STOP", usage=usage)),
                     Reply(chunk(text("b"), finish="STOP", usage=usage)),
                     Reply(status=503, error=gemini_error(503, "busy", "UNAVAILABLE"))]
    post(proxy, messages_body())
    stream(proxy, messages_body())
    post(proxy, messages_body())
    request(proxy, "GET", "/v1/nothing")
    body = request(proxy, "GET", "/metrics").raw.decode()
    lines = set(body.splitlines())
    assert 'claude_gemini_proxy_requests_total{route="/v1/messages",status="200",model="gemini-3.5-flash"} 2' in lines
    assert 'claude_gemini_proxy_requests_total{route="/v1/messages",status="529",model="gemini-3.5-flash"} 1' in lines
    assert 'claude_gemini_proxy_requests_total{route="other",status="404",model="-"} 1' in lines
    assert 'claude_gemini_proxy_tokens_total{model="gemini-3.5-flash",kind="input"} 60' in lines
    assert 'claude_gemini_proxy_tokens_total{model="gemini-3.5-flash",kind="cached"} 40' in lines
    assert 'claude_gemini_proxy_tokens_total{model="gemini-3.5-flash",kind="output"} 14' in lines
    assert 'claude_gemini_proxy_tokens_total{model="gemini-3.5-flash",kind="thinking"} 0' in lines
    assert 'claude_gemini_proxy_upstream_calls_total{model="gemini-3.5-flash",reason="first"} 3' in lines
    assert "claude_gemini_proxy_upstream_seconds_count 3" in lines
    assert "claude_gemini_proxy_first_chunk_seconds_count 1" in lines
    assert "claude_gemini_proxy_streams_open 0" in lines and "claude_gemini_proxy_keys_resting 0" in lines


def test_metrics_count_upstream_calls_by_reason_and_tokens_per_model(gemini, start_proxy):
    proxy = start_proxy(make_config(gemini, max_retries=1), Clock())
    thinking = {"promptTokenCount": 50, "cachedContentTokenCount": 30, "candidatesTokenCount": 5,
                "thoughtsTokenCount": 12}
    gemini.script = [Reply(status=503, error=gemini_error(503, "busy", "UNAVAILABLE")),
                     Reply(chunk(text("a"), finish="STOP", usage=thinking)),  # first + retry_status
                     Reply(chunk(finish="STOP")), Reply(chunk(text("b"), finish="STOP")),  # retry_empty
                     Reply(chunk(finish="MALFORMED_FUNCTION_CALL")),
                     Reply(chunk(text("c"), finish="STOP"))]  # retry_malformed
    for model in ("gemini-3.1-pro-preview", "gemini-3.5-flash", "gemini-3.5-flash"):
        assert post(proxy, messages_body(model=model)).status == 200
    lines = set(request(proxy, "GET", "/metrics").raw.decode().splitlines())
    name = "claude_gemini_proxy_upstream_calls_total"
    for model, reason, count in [
            ("gemini-3.1-pro-preview", "first", 1), ("gemini-3.1-pro-preview", "retry_status", 1),
            ("gemini-3.5-flash", "first", 2), ("gemini-3.5-flash", "retry_empty", 1),
            ("gemini-3.5-flash", "retry_malformed", 1), ("gemini-3.5-flash", "self_heal", 0)]:
        assert f'{name}{{model="{model}",reason="{reason}"}} {count}' in lines
    assert len(gemini.bodies) == 6
    tokens = "claude_gemini_proxy_tokens_total"
    assert f'{tokens}{{model="gemini-3.1-pro-preview",kind="cached"}} 30' in lines
    assert f'{tokens}{{model="gemini-3.1-pro-preview",kind="thinking"}} 12' in lines
    assert f'{tokens}{{model="gemini-3.1-pro-preview",kind="output"}} 17' in lines


def test_metrics_need_the_proxy_token(gemini, start_proxy):
    guarded = start_proxy(make_config(gemini, proxy_auth_token="s3cret"))
    assert request(guarded, "GET", "/metrics").status == 401
    assert request(guarded, "GET", "/metrics", headers={"x-api-key": "s3cret"}).status == 200


def token_command(tmp_path):
    counter = tmp_path / "runs"
    return (f"n=$(cat {counter} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {counter}; echo token-$n")


def bearer_tokens(gemini):
    return [{k.lower(): v for k, v in r[2].items()}.get("authorization") for r in gemini.requests]


def test_token_command_runs_again_after_its_ttl(gemini, start_proxy, tmp_path):
    clock = Clock()
    proxy = start_proxy(make_config(gemini, api_keys=(), auth_command=token_command(tmp_path),
                                    auth_ttl=300), clock)
    post(proxy, messages_body())
    clock.time += 299
    post(proxy, messages_body())
    clock.time += 2
    post(proxy, messages_body())
    assert bearer_tokens(gemini) == ["Bearer token-1", "Bearer token-1", "Bearer token-2"]


def test_token_command_runs_again_after_a_401_and_the_request_is_retried(gemini, start_proxy, tmp_path):
    proxy = start_proxy(make_config(gemini, api_keys=(), auth_command=token_command(tmp_path)))
    gemini.script = [Reply(status=401, error=gemini_error(401, "token expired", "UNAUTHENTICATED"))]
    answer = post(proxy, messages_body())
    assert answer.status == 200
    assert bearer_tokens(gemini) == ["Bearer token-1", "Bearer token-2"]


def test_token_command_makes_the_api_key_optional():
    config = cgp.read_config([], {"GEMINI_AUTH_COMMAND": "gcloud auth print-access-token"})
    assert config.auth_type == "bearer" and config.api_keys == () and config.signature_key


def test_request_id_matches_header_error_body_and_log_line(gemini, proxy, caplog):
    caplog.set_level("DEBUG", logger="claude_gemini_proxy")
    gemini.script = [Reply(status=400, error=gemini_error(400, "bad thing"))]
    answer = post(proxy, messages_body())
    request_id = answer.headers["request-id"]
    assert answer.json["request_id"] == request_id and request_id.startswith("req_")
    deadline = time.monotonic() + 2
    while not any(request_id in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert any(r.threadName == request_id and "upstream POST" in r.getMessage() for r in caplog.records)
    assert any(request_id in r.getMessage() and " 400 " in r.getMessage() for r in caplog.records)


def test_access_line_shows_tokens_cache_share_and_claude_code_ids(gemini, proxy, caplog):
    caplog.set_level("INFO", logger="claude_gemini_proxy")
    usage = {"promptTokenCount": 900, "cachedContentTokenCount": 600, "candidatesTokenCount": 3,
             "thoughtsTokenCount": 4}
    gemini.script = [Reply(chunk(text("hi"), finish="STOP", usage=usage))]
    headers = {"x-claude-code-session-id": "ec847b96-6f88", "x-claude-code-agent-id": "agent 7=x"}
    answer = post(proxy, messages_body(), headers=headers)
    deadline = time.monotonic() + 2
    lines = []
    while not lines and time.monotonic() < deadline:
        lines = [r.getMessage() for r in caplog.records if answer.headers["request-id"] in r.getMessage()
                 and r.getMessage().startswith("POST")]
        time.sleep(0.01)
    assert len(lines) == 1
    assert " input=300 cached=600 output=7 thinking=4 cache=67% session=ec847b96-6f88 agent=agent?7?x " \
        in lines[0], lines[0]


# == Upstream client =========================================================
# Pooling, stale connections, CONNECT tunnels, retries, keys and auth headers.

def accept_forever(listener, serve, on_accept=None):
    """Serve each connection of a listening socket in its own thread until the socket closes."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        if on_accept:
            on_accept(conn)
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


class KeyedGemini(FakeGemini):
    """FakeGemini that can answer per API key and misbehave per request number (1-based)."""

    def __init__(self):
        super().__init__()
        self.key_errors = {}  # api key -> (status, gemini error object), answered every time
        self.hang_up_after = set()  # answer these requests, then close the connection silently
        self.drop = set()  # close the connection on these requests without answering

    def respond(self, handler, body):
        with self.lock:
            number = len(self.requests)
        if number in self.drop:
            handler.close_connection = True
            return
        key = handler.headers.get("x-goog-api-key")
        if key in self.key_errors:
            status, error = self.key_errors[key]
            handler.reply(status, {"error": error})
        else:
            super().respond(handler, body)
        if number in self.hang_up_after:
            # No "Connection: close": the proxy pools the connection and only finds out later.
            handler.close_connection = True


@pytest.fixture
def keyed():
    fake = KeyedGemini()
    yield fake
    fake.close()


def upstream_headers(fake):
    """Lower-cased headers of each POST the fake received."""
    return [{k.lower(): v for k, v in r[2].items()} for r in fake.requests if r[0] == "POST"]


def used_keys(fake):
    return [h.get("x-goog-api-key") for h in upstream_headers(fake)]


def wait_pool_sees_eof(proxy, count=1):
    """Wait until `count` pooled upstream sockets have seen the fake close them."""
    idle = list(proxy.server.upstream._idle)
    assert len(idle) == count, f"expected {count} pooled connection(s), pool holds {len(idle)}"
    deadline = time.monotonic() + 3
    for conn in idle:
        ready = select.select([conn.sock], [], [], max(0.0, deadline - time.monotonic()))[0]
        assert ready, "the fake did not close the pooled connection"


def retry_info(delay):
    return [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}]


def quota_error(delay):
    return gemini_error(429, "Resource has been exhausted", "RESOURCE_EXHAUSTED", retry_info(delay))


KEY_INVALID = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                "domain": "googleapis.com"}]


class TunnelProxy:
    """A tiny HTTP proxy that only does CONNECT (to 127.0.0.1) and pipes bytes both ways."""

    def __init__(self):
        self.connects = []  # (request line, {header: value})
        self.others = []  # request lines that were not CONNECT
        self.sockets = []
        self.lock = threading.Lock()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, userinfo=""):
        return f"http://{userinfo}127.0.0.1:{self.port}"

    def _accept(self):
        accept_forever(self.listener, self._serve, self._remember)

    def _remember(self, client):
        with self.lock:
            self.sockets.append(client)

    def _serve(self, client):
        data = b""
        while b"\r\n\r\n" not in data:
            piece = client.recv(65536)
            if not piece:
                client.close()
                return
            data += piece
        head, rest = data.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        method, target = lines[0].split(" ")[:2]
        if method != "CONNECT":
            with self.lock:
                self.others.append(lines[0])
            client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            client.close()
            return
        with self.lock:
            self.connects.append((lines[0], headers))
        host, _, port = target.rpartition(":")
        if host != "127.0.0.1":
            client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            client.close()
            return
        upstream = socket.create_connection((host, int(port)))
        with self.lock:
            self.sockets.append(upstream)
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        if rest:
            upstream.sendall(rest)
        threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
        self._pipe(upstream, client)

    @staticmethod
    def _pipe(source, target):
        try:
            while True:
                piece = source.recv(65536)
                if not piece:
                    break
                target.sendall(piece)
        except OSError:
            pass
        try:
            target.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self):
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                try:
                    sock.close()
                except OSError:
                    pass


@pytest.fixture
def tunnel():
    server = TunnelProxy()
    yield server
    server.close()


# -- 1. Pool reuse -------------------------------------------------------------

def test_pooled_connection_is_reused_across_requests(gemini, proxy):
    for i in range(20):
        answer = post(proxy, messages_body(f"question {i}"))
        assert answer.status == 200, answer.raw
        assert answer.json["content"][0]["text"] == "Hello from Gemini."
    for i in range(5):
        _, message = stream(proxy, messages_body(f"streamed {i}"))
        assert message["content"][0]["text"] == "Hello from Gemini."
    assert len(gemini.bodies) == 25
    assert gemini.connections == 1
    assert proxy.server.upstream.connections_opened == 1
    assert len(proxy.server.upstream._idle) == 1


# -- 2. Stale pooled connections -----------------------------------------------

def test_stale_pooled_connection_is_retried_once_on_a_fresh_one(keyed, start_proxy):
    proxy = start_proxy(make_config(keyed))
    keyed.hang_up_after = {1, 2, 3}
    assert post(proxy, messages_body("one")).status == 200
    wait_pool_sees_eof(proxy)

    answer = post(proxy, messages_body("two"))  # the pooled connection is dead: a new one serves it
    assert answer.status == 200, answer.raw
    assert answer.json["content"][0]["text"] == "Hello from Gemini."
    assert proxy.server.upstream.connections_opened == 2
    assert keyed.connections == 2
    wait_pool_sees_eof(proxy)

    _, message = stream(proxy, messages_body("three"))  # the same holds for a streamed request
    assert message["content"][0]["text"] == "Hello from Gemini."
    assert proxy.server.upstream.connections_opened == 3
    assert len(keyed.bodies) == 3
    assert proxy.server.upstream.retries == 0  # a stale connection is not an upstream retry


def test_stale_connection_whose_fresh_replacement_also_fails_is_502(keyed, start_proxy):
    proxy = start_proxy(make_config(keyed))
    keyed.hang_up_after = {1}
    keyed.drop = {2}
    assert post(proxy, messages_body("one")).status == 200
    wait_pool_sees_eof(proxy)

    answer = post(proxy, messages_body("two"))
    assert answer.status == 502, answer.raw
    assert answer.json["type"] == "error" and answer.json["error"]["type"] == "api_error"
    assert len(keyed.bodies) == 2  # the fresh connection reached the fake, which hung up
    assert proxy.server.upstream.connections_opened == 2  # one replacement, no more
    assert keyed.connections == 2

    answer = post(proxy, messages_body("three"))  # and the proxy recovers
    assert answer.status == 200, answer.raw


def test_stale_retry_uses_a_fresh_connection_not_another_pooled_one(keyed, start_proxy):
    """Two idle connections that both went stale (an upstream restart): the retry must not pick
    the second dead one from the pool."""
    proxy = start_proxy(make_config(keyed))
    keyed.hang_up_after = {1, 2}
    keyed.script = [Reply(chunk(text("slow a"), finish="STOP"), before=0.3),
                    Reply(chunk(text("slow b"), finish="STOP"), before=0.3)]
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(post(proxy, messages_body(f"p{i}"))))
               for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.status for r in results] == [200, 200]
    assert proxy.server.upstream.connections_opened == 2
    wait_pool_sees_eof(proxy, count=2)

    answer = post(proxy, messages_body("after the restart"))
    assert answer.status == 200, answer.raw
    assert proxy.server.upstream.connections_opened == 3


# -- 3. CONNECT tunnelling through an egress proxy -----------------------------

def test_http_proxy_tunnels_with_connect_and_pools_the_tunnel(gemini, tunnel, start_proxy):
    proxy = start_proxy(make_config(gemini, http_proxy=tunnel.url()))
    fake_port = gemini.server.server_address[1]
    for i in range(2):
        answer = post(proxy, messages_body(f"via tunnel {i}"))
        assert answer.status == 200, answer.raw
        assert answer.json["content"][0]["text"] == "Hello from Gemini."
    assert [line.split()[:2] for line, _ in tunnel.connects] == [["CONNECT", f"127.0.0.1:{fake_port}"]]
    assert "proxy-authorization" not in tunnel.connects[0][1]
    assert tunnel.others == []
    assert len(gemini.bodies) == 2
    assert gemini.connections == 1  # one tunnel, reused
    assert proxy.server.upstream.connections_opened == 1
    paths = [r[1] for r in gemini.requests]
    assert all(p.startswith("/v1beta/models/") for p in paths), paths


def test_http_proxy_credentials_become_proxy_authorization(gemini, tunnel, start_proxy):
    proxy = start_proxy(make_config(gemini, http_proxy=tunnel.url("user:p%40ss@")))
    answer = post(proxy, messages_body())
    assert answer.status == 200, answer.raw
    assert len(tunnel.connects) == 1
    expected = "Basic " + base64.b64encode(b"user:p@ss").decode()
    assert tunnel.connects[0][1].get("proxy-authorization") == expected
    # the credentials are for the tunnel only: Gemini never sees them
    sent = upstream_headers(gemini)[0]
    assert "proxy-authorization" not in sent
    assert "p@ss" not in json.dumps(sent) and "p%40ss" not in json.dumps(sent)


def test_no_proxy_host_goes_direct(gemini, tunnel, start_proxy):
    proxy = start_proxy(make_config(gemini, http_proxy=tunnel.url(), no_proxy="127.0.0.1"))
    answer = post(proxy, messages_body())
    assert answer.status == 200, answer.raw
    assert tunnel.connects == [] and tunnel.others == []
    assert len(gemini.bodies) == 1 and gemini.connections == 1


def test_https_proxy_is_not_used_for_an_http_api_base(gemini, tunnel, start_proxy):
    proxy = start_proxy(make_config(gemini, https_proxy=tunnel.url()))
    assert post(proxy, messages_body()).status == 200
    assert tunnel.connects == [] and tunnel.others == []
    assert len(gemini.bodies) == 1


# -- 4. Retries ----------------------------------------------------------------

def test_503_then_200_is_retried_and_answered(gemini, start_proxy):
    clock = Clock()
    proxy = start_proxy(make_config(gemini, max_retries=2), clock)
    gemini.script = [Reply(status=503, error=gemini_error(503, "overloaded", "UNAVAILABLE")),
                     Reply(chunk(text("second try"), finish="STOP"))]
    answer = post(proxy, messages_body())
    assert answer.status == 200, answer.raw
    assert answer.json["content"][0]["text"] == "second try"
    assert len(gemini.bodies) == 2
    assert proxy.server.upstream.retries == 1
    assert len(clock.slept) == 1 and 0.5 <= clock.slept[0] <= 0.625  # backoff with jitter


def test_429_with_short_retry_delay_waits_and_retries(gemini, start_proxy):
    clock = Clock()
    proxy = start_proxy(make_config(gemini, max_retries=2), clock)
    gemini.script = [Reply(status=429, error=quota_error("2.5s")),
                     Reply(chunk(text("after the wait"), finish="STOP"))]
    answer = post(proxy, messages_body())
    assert answer.status == 200, answer.raw
    assert answer.json["content"][0]["text"] == "after the wait"
    assert len(gemini.bodies) == 2
    assert proxy.server.upstream.retries == 1
    assert clock.slept == [2.5]


def test_429_with_retry_delay_past_max_retry_wait_is_answered_at_once(gemini, start_proxy):
    clock = Clock()
    proxy = start_proxy(make_config(gemini, max_retries=2, max_retry_wait=30), clock)
    gemini.script = [Reply(status=429, error=quota_error("120s")),
                     Reply(chunk(text("must not be asked for"), finish="STOP"))]
    answer = post(proxy, messages_body())
    assert answer.status == 429, answer.raw
    assert answer.json["error"]["type"] == "rate_limit_error"
    assert answer.headers["retry-after"] == "120"
    assert len(gemini.bodies) == 1
    assert proxy.server.upstream.retries == 0
    assert clock.slept == []


def test_retries_stop_after_max_retries_with_529(gemini, start_proxy):
    clock = Clock()
    proxy = start_proxy(make_config(gemini, max_retries=2), clock)
    overloaded = Reply(status=503, error=gemini_error(503, "The model is overloaded.", "UNAVAILABLE"))
    gemini.script = [overloaded, overloaded, overloaded, Reply(chunk(text("fourth"), finish="STOP"))]
    answer = post(proxy, messages_body())
    assert answer.status == 529, answer.raw
    assert answer.json["error"]["type"] == "overloaded_error"
    assert len(gemini.bodies) == 3
    assert proxy.server.upstream.retries == 2
    assert len(clock.slept) == 2 and 0.5 <= clock.slept[0] <= 0.625 <= 1 <= clock.slept[1] <= 1.25


def test_400_is_never_retried(gemini, start_proxy):
    proxy = start_proxy(make_config(gemini, max_retries=2))
    gemini.script = [Reply(status=400, error=gemini_error(400, "bad field")),
                     Reply(chunk(text("must not be asked for"), finish="STOP"))]
    answer = post(proxy, messages_body())
    assert answer.status == 400, answer.raw
    assert answer.json["error"]["type"] == "invalid_request_error"
    assert answer.headers.get("x-should-retry") == "false"
    assert len(gemini.bodies) == 1
    assert proxy.server.upstream.retries == 0


def test_nothing_is_retried_once_a_stream_sent_data(gemini, start_proxy):
    proxy = start_proxy(make_config(gemini, max_retries=2))
    gemini.script = [Reply(chunk(text("partial answer")),
                           {"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}),
                     Reply(chunk(text("a retry would say this"), finish="STOP"))]
    answer = post(proxy, dict(messages_body(), stream=True))
    assert answer.status == 200
    events, message = read_sse(answer.raw)
    assert message is None  # the stream ended with an error event
    deltas = [e["delta"]["text"] for e in events if e["type"] == "content_block_delta"]
    assert "".join(deltas) == "partial answer"
    assert events[-1]["type"] == "error"
    assert events[-1]["error"]["type"] == "overloaded_error"
    assert b"a retry would say this" not in answer.raw
    assert len(gemini.bodies) == 1
    assert proxy.server.upstream.retries == 0


# -- 5. Key rotation -----------------------------------------------------------

def test_keys_are_used_in_turn(keyed, start_proxy):
    proxy = start_proxy(make_config(keyed, api_keys=("k1", "k2", "k3")))
    for i in range(6):
        assert post(proxy, messages_body(f"q{i}")).status == 200
    assert used_keys(keyed) == ["k1", "k2", "k3", "k1", "k2", "k3"]


def test_rate_limited_key_rests_while_the_others_serve(keyed, start_proxy):
    clock = Clock()
    proxy = start_proxy(make_config(keyed, api_keys=("k1", "k2", "k3"), max_retries=2), clock)
    keyed.key_errors["k2"] = (429, quota_error("60s"))
    statuses = [post(proxy, messages_body(f"q{i}")).status for i in range(6)]
    assert statuses == [200] * 6
    keys = used_keys(keyed)
    assert keys.count("k2") == 1  # met once, then resting
    # the request that met k2 went on with k3 at once; then k1 and k3 take turns
    assert keys == ["k1", "k2", "k3", "k1", "k3", "k1", "k3"]
    assert clock.slept == []  # no waiting for the 60 s


def test_invalid_key_is_dropped_and_never_sent_again(keyed, start_proxy):
    proxy = start_proxy(make_config(keyed, api_keys=("k1", "k2", "k3")))
    keyed.key_errors["k2"] = (400, gemini_error(400, "API key not valid. Please pass a valid API key.",
                                                details=KEY_INVALID))
    statuses = [post(proxy, messages_body(f"q{i}")).status for i in range(6)]
    assert statuses == [200] * 6
    keys = used_keys(keyed)
    assert keys[:2] == ["k1", "k2"]
    assert keys.count("k2") == 1
    assert keys[2] in ("k1", "k3")  # the request that met k2 was answered with a valid key
    assert len(keys) == 7
    assert proxy.server.upstream.keys.keys == ["k1", "k3"]


def test_dropped_key_hands_its_turn_to_the_next_key(keyed, start_proxy):
    """After k2 is dropped the rotation goes on k3, k1, k3, ... not k1 twice in a row."""
    proxy = start_proxy(make_config(keyed, api_keys=("k1", "k2", "k3")))
    keyed.key_errors["k2"] = (400, gemini_error(400, "API key not valid. Please pass a valid API key.",
                                                details=KEY_INVALID))
    for i in range(4):
        assert post(proxy, messages_body(f"q{i}")).status == 200
    assert used_keys(keyed) == ["k1", "k2", "k3", "k1", "k3"]


# -- 6. Upstream auth headers --------------------------------------------------

CLIENT_HEADERS = {"x-api-key": "client-secret-key", "authorization": "Bearer client-secret-token",
                  "anthropic-version": "2023-06-01", "anthropic-beta": "interleaved-thinking-2025-05-14",
                  "anthropic-dangerous-direct-browser-access": "true"}


def exercise(proxy):
    """A non-stream, a streamed and a count_tokens request, all with the client's own headers."""
    assert post(proxy, messages_body(), headers=CLIENT_HEADERS).status == 200
    answer = post(proxy, dict(messages_body(), stream=True), headers=CLIENT_HEADERS)
    assert answer.status == 200 and read_sse(answer.raw)[1] is not None
    answer = post(proxy, messages_body(), path="/v1/messages/count_tokens", headers=CLIENT_HEADERS)
    assert answer.status == 200, answer.raw


def assert_client_headers_not_forwarded(fake, key):
    assert len(fake.requests) == 3
    for method, path, headers, _ in fake.requests:
        assert key not in path and "key=" not in path, path
        lower = {k.lower(): v for k, v in headers.items()}
        assert "x-api-key" not in lower
        assert not [name for name in lower if name.startswith("anthropic")], lower
        values = json.dumps(lower)
        assert "client-secret" not in values


def test_default_auth_sends_x_goog_api_key_only(gemini, start_proxy):
    key = "AIzaSy-default-secret"
    proxy = start_proxy(make_config(gemini, api_keys=(key,)))
    exercise(proxy)
    for headers in upstream_headers(gemini):
        assert headers.get("x-goog-api-key") == key
        assert "authorization" not in headers
    assert_client_headers_not_forwarded(gemini, key)


def test_bearer_auth_sends_authorization_only(gemini, start_proxy):
    key = "ya29.bearer-secret"
    proxy = start_proxy(make_config(gemini, api_keys=(key,), auth_type="bearer"))
    exercise(proxy)
    for headers in upstream_headers(gemini):
        assert headers.get("authorization") == f"Bearer {key}"
        assert "x-goog-api-key" not in headers
    assert_client_headers_not_forwarded(gemini, key)


def test_bearer_auth_type_is_read_from_the_environment():
    config = cgp.read_config([], {"GEMINI_API_KEY": "k", "GEMINI_AUTH_TYPE": "bearer"})
    assert config.auth_type == "bearer"
    assert cgp.UpstreamClient(config, cgp.Metrics())._auth_headers("k") == {"Authorization": "Bearer k"}


# == Self-healing =============================================================

def warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


def unknown_field(field, at="generation_config"):
    return gemini_error(400, f"Invalid JSON payload received. Unknown name \"{field}\" at '{at}': Cannot find field.")


def test_a_400_naming_temperature_is_retried_without_it_and_the_next_request_sends_none(gemini, proxy, caplog):
    caplog.set_level("INFO", logger="claude_gemini_proxy")
    gemini.script = [Reply(status=400, error=unknown_field("temperature"))]
    answer = post(proxy, messages_body(temperature=0.2, top_p=0.9))
    assert answer.status == 200 and answer.json["content"][0]["text"] == "Hello from Gemini."
    sent = [body["generationConfig"] for body in gemini.bodies]
    assert len(sent) == 2 and sent[0]["temperature"] == 0.2 and "temperature" not in sent[1]
    assert sent[1]["topP"] == 0.9 and sent[1]["maxOutputTokens"] == sent[0]["maxOutputTokens"]
    assert gemini.bodies[1]["contents"] == gemini.bodies[0]["contents"]  # no user content dropped
    assert post(proxy, messages_body(temperature=0.7)).status == 200
    assert len(gemini.bodies) == 3 and "temperature" not in gemini.bodies[2]["generationConfig"]
    said = warnings(caplog)
    assert len(said) == 1 and said[0].startswith("gemini-3.5-flash refuses temperature; the proxy leaves it out")
    calls = request(proxy, "GET", "/metrics").raw.decode().splitlines()
    assert 'claude_gemini_proxy_upstream_calls_total{model="gemini-3.5-flash",reason="self_heal"} 1' in calls


def test_a_field_refused_again_after_the_fix_is_not_retried_again(gemini, proxy):
    gemini.script = [Reply(status=400, error=unknown_field("temperature"))] * 2
    answer = post(proxy, messages_body(temperature=0.2))
    assert answer.status == 400 and "temperature" in answer.json["error"]["message"]
    assert len(gemini.bodies) == 2
    assert post(proxy, messages_body(temperature=0.2)).status == 200  # a change that did not help
    assert gemini.bodies[2]["generationConfig"]["temperature"] == 0.2  # is not remembered


def test_a_400_about_what_the_answer_depends_on_stands(gemini, proxy):
    message = "* GenerateContentRequest.generation_config.max_output_tokens: must be positive"
    gemini.script = [Reply(status=400, error=gemini_error(400, message))]
    answer = post(proxy, messages_body(temperature=0.2))
    assert answer.status == 400 and answer.json["error"]["message"] == f"Gemini: {message}"
    assert answer.headers["x-should-retry"] == "false" and len(gemini.bodies) == 1


SCHEMA_OUTPUT = {"format": {"type": "json_schema", "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}}


def thinking_config(g):
    return g["generationConfig"].get("thinkingConfig")


# (model, body, Gemini's 400 message, what the first call had, what the retry and the next request have)
OPTIONAL_FIELD_REFUSALS = {
    "thinkingLevel value": (
        "gemini-3.5-flash", messages_body(thinking={"type": "disabled"}),
        "Thinking level MINIMAL is not supported by this model. Supported levels: LOW, MEDIUM, HIGH.",
        lambda g: thinking_config(g) == {"thinkingLevel": "MINIMAL"},
        lambda g: thinking_config(g) == {"thinkingLevel": "LOW"}),
    "thinkingBudget range": (
        "gemini-2.5-flash", messages_body(thinking={"type": "enabled", "budget_tokens": 30000}),
        "* GenerateContentRequest.generation_config.thinking_config.thinking_budget: must be between 128 and 16384",
        lambda g: thinking_config(g)["thinkingBudget"] == 24576,
        lambda g: thinking_config(g)["thinkingBudget"] == 16384),
    "thinkingBudget": (
        "gemini-2.5-flash", messages_body(thinking={"type": "enabled", "budget_tokens": 2048}),
        "Thinking budget is not supported by this model; set a thinking level instead.",
        lambda g: thinking_config(g) == {"thinkingBudget": 2048, "includeThoughts": True},
        lambda g: thinking_config(g) == {"thinkingLevel": "LOW", "includeThoughts": True}),
    "includeThoughts": (
        "gemini-3.5-flash", messages_body(thinking={"type": "adaptive"}),
        "include_thoughts is only supported when thinking is enabled",
        lambda g: thinking_config(g)["includeThoughts"] is True,
        lambda g: "includeThoughts" not in thinking_config(g)),
    "safety category": (
        "gemini-3.5-flash", messages_body(),
        "* GenerateContentRequest.safety_settings[3].category: HARM_CATEGORY_DANGEROUS_CONTENT is not supported",
        lambda g: len(g["safetySettings"]) == 4,
        lambda g: [s["category"] for s in g["safetySettings"]] == [
            "HARM_CATEGORY_HARASSMENT", "HARM_CATEGORY_HATE_SPEECH", "HARM_CATEGORY_SEXUALLY_EXPLICIT"]),
    "responseJsonSchema": (
        "gemini-3.5-flash", messages_body(output_config=SCHEMA_OUTPUT), unknown_field("responseJsonSchema")["message"],
        lambda g: "responseJsonSchema" in g["generationConfig"],
        lambda g: "responseJsonSchema" not in g["generationConfig"]
        and g["generationConfig"]["responseMimeType"] == "application/json"
        and list(g)[0] == "systemInstruction" and "JSON Schema" in g["systemInstruction"]["parts"][-1]["text"]),
    "media inside functionResponse.parts": (
        "gemini-3.5-flash", messages_body(None, messages=tool_loop_messages(image_result()[0])),
        unknown_field("parts", "contents[2].parts[0].function_response")["message"],
        lambda g: "parts" in g["contents"][2]["parts"][0]["functionResponse"],
        lambda g: "parts" not in g["contents"][2]["parts"][0]["functionResponse"]
        and "inlineData" in g["contents"][2]["parts"][1]),
    "prefill": (
        "gemini-3.5-flash", messages_body(None, messages=[{"role": "user", "content": "Name a colour."},
                                                          {"role": "assistant", "content": "The colour is"}]),
        "Requests ending with a model turn are not supported.",
        lambda g: g["contents"][-1] == {"role": "model", "parts": [{"text": "The colour is"}]},
        lambda g: g["contents"] == [{"role": "user", "parts": [
            {"text": "Name a colour."}, {"text": cgp.PREFILL_NOTE + "The colour is"}]}]),
}


@pytest.mark.parametrize("case", OPTIONAL_FIELD_REFUSALS)
def test_a_400_naming_an_optional_field_is_retried_fixed_and_remembered(gemini, proxy, caplog, case):
    model, body, message, before, after = OPTIONAL_FIELD_REFUSALS[case]
    body = dict(body, model=model)
    gemini.script = [Reply(status=400, error=gemini_error(400, message))]
    answer = post(proxy, body)
    assert answer.status == 200, answer.raw
    first, retry = gemini.bodies
    assert before(first) and not after(first) and after(retry)
    assert post(proxy, body).status == 200 and after(gemini.bodies[2])
    assert len(gemini.bodies) == 3 and len(warnings(caplog)) == 1 and model in warnings(caplog)[0]


SCHEMA_TOOLS = [{"name": "Read", "description": "Read a file.", "input_schema": {
                 "type": "object", "properties": {"file_path": {"type": "string"}}, "required": ["file_path"]}},
             {"name": "mcp__srv__query", "description": "Query the store.",
              "input_schema": REJECTED_SCHEMAS["integer enum on an array-or-null property"][0]}]
SCHEMA_400 = ("* GenerateContentRequest.tools[0].function_declarations[1].parameters.properties[levels].enum[0]: "
              "enum: only allowed for STRING type")


def test_a_tool_schema_400_is_retried_with_the_schema_reduced_and_remembered(gemini, proxy, caplog):
    gemini.script = [Reply(status=400, error=gemini_error(400, SCHEMA_400))]
    answer = post(proxy, messages_body(tools=SCHEMA_TOOLS))
    assert answer.status == 200, answer.raw
    first, retry = [body["tools"][0]["functionDeclarations"] for body in gemini.bodies]
    assert first[1]["parametersJsonSchema"] == SCHEMA_TOOLS[1]["input_schema"]
    assert retry[0] == first[0]  # the other tools go as they were
    assert set(retry[1]) == {"name", "description", "parameters"}
    assert retry[1]["description"].startswith("Query the store.") and "`levels`: one of 1, 2, 3" in retry[1]["description"]
    assert post(proxy, messages_body("again", tools=SCHEMA_TOOLS)).status == 200
    assert len(gemini.bodies) == 3 and gemini.bodies[2]["tools"][0]["functionDeclarations"] == retry
    assert post(proxy, messages_body("count", tools=SCHEMA_TOOLS), "/v1/messages/count_tokens").status == 200
    assert gemini.bodies[3]["generateContentRequest"]["tools"][0]["functionDeclarations"] == retry
    said = warnings(caplog)
    assert len(said) == 1 and said[0].startswith("tool mcp__srv__query: Gemini rejects its input schema")


def test_with_tool_schema_repair_off_the_400_names_the_client_tool(gemini, start_proxy):
    proxy = start_proxy(make_config(gemini, tool_schema_repair=False))
    gemini.script = [Reply(status=400, error=gemini_error(400, SCHEMA_400))]
    answer = post(proxy, messages_body(tools=SCHEMA_TOOLS))
    assert answer.status == 400 and len(gemini.bodies) == 1
    assert answer.json["error"]["message"] == f"tool `mcp__srv__query` has an input schema Gemini rejects: {SCHEMA_400}"


def test_a_404_for_a_model_names_it_and_the_closest_available(gemini, proxy):
    gemini.retired.add("gemini-2.0-flash")
    answer = post(proxy, messages_body(model="gemini-2.0-flash"))
    assert answer.status == 404 and answer.json["error"]["type"] == "not_found_error"
    assert answer.json["error"]["message"] == (
        "model: Gemini does not serve gemini-2.0-flash (retired, renamed or misspelt); closest available: "
        "gemini-2.5-flash, gemini-3.5-flash; route the name elsewhere with MODEL_MAP or MODEL_FALLBACKS")
    assert answer.headers["x-should-retry"] == "false"


def wait_for_log(caplog, start):
    """Return the log lines starting with `start`, waiting for the access line (written after the answer)."""
    deadline = time.monotonic() + 2
    while not any(r.getMessage().startswith(start) for r in caplog.records) and time.monotonic() < deadline:
        time.sleep(0.005)
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(start)]


def overloaded(status):
    kind = {404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}[status]
    return Reply(status=status, error=gemini_error(status, "no", kind))


@pytest.mark.parametrize("status", [404, 429, 503])
@pytest.mark.parametrize("streamed", [False, True])
def test_model_fallbacks_answer_once_for_a_retired_limited_or_overloaded_model(gemini, start_proxy, caplog, status,
                                                                              streamed):
    caplog.set_level("INFO", logger="claude_gemini_proxy")
    proxy = start_proxy(make_config(gemini, model_fallbacks=(("gemini-3.1-pro-preview", "gemini-3.5-flash"),
                                                             ("gemini-3.5-flash", "gemini-3.5-flash-lite"))))
    gemini.script = [overloaded(status)]
    answer = post(proxy, messages_body(model="gemini-3.1-pro-preview", stream=streamed))
    assert answer.status == 200 and answer.headers["x-gemini-model"] == "gemini-3.5-flash"
    assert [r[1].split(":")[0] for r in gemini.requests] == ["/v1beta/models/gemini-3.1-pro-preview",
                                                            "/v1beta/models/gemini-3.5-flash"]
    access = wait_for_log(caplog, "POST /v1/messages 200")
    assert len(access) == 1 and "model=gemini-3.5-flash " in access[0]
    gemini.script = [overloaded(status), overloaded(503)]  # once: the fallback's own fallback is not tried
    answer = post(proxy, messages_body(model="gemini-3.1-pro-preview", stream=streamed))
    assert answer.status == 529 and len(gemini.requests) == 4


def test_rules_follow_the_model_gemini_says_serves_the_name(gemini, proxy, caplog):
    caplog.set_level("INFO", logger="claude_gemini_proxy")
    gemini.served_as["gemini-3.5-flash"] = "gemini-3.6-flash"
    assert post(proxy, messages_body(temperature=0.2)).status == 200
    assert post(proxy, messages_body(temperature=0.2)).status == 200
    first, second = [body["generationConfig"] for body in gemini.bodies]
    assert first["temperature"] == 0.2 and "temperature" not in second  # 3.6 ignores or refuses it
    assert sum("Gemini serves gemini-3.5-flash with gemini-3.6-flash" in r.getMessage() for r in caplog.records) == 1


def test_a_prefill_goes_in_the_user_turn_for_models_that_refuse_one():
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The colour is"}]
    older = translate({"messages": messages}, model="gemini-3.5-flash")
    assert older.body["contents"][-1]["role"] == "model"
    newer = translate({"messages": messages}, model="gemini-3.6-flash")
    assert newer.body["contents"] == [{"role": "user", "parts": [
        {"text": "Name a colour."}, {"text": cgp.PREFILL_NOTE + "The colour is"}]}]


def test_rules_use_the_model_lists_limits_and_thinking(gemini, proxy):
    gemini.models.append({"name": "models/gemini-9-nothink", "inputTokenLimit": 32768, "outputTokenLimit": 4096,
                          "supportedGenerationMethods": ["generateContent"], "thinking": False})
    assert request(proxy, "GET", "/v1/models?limit=1000").status == 200
    body = messages_body(model="gemini-9-nothink", max_tokens=20000, thinking={"type": "adaptive"})
    assert post(proxy, body).status == 200
    sent = gemini.bodies[-1]["generationConfig"]
    assert sent["maxOutputTokens"] == 4096 and "thinkingConfig" not in sent


def test_529_without_a_gemini_retry_delay_carries_the_proxys_own_backoff(gemini, proxy):
    gemini.script = [overloaded(503)]
    answer = post(proxy, messages_body())
    assert answer.status == 529 and answer.headers["retry-after"] == "2"


def debug_lines(caplog, start):
    return [r.getMessage() for r in caplog.records if r.levelname == "DEBUG" and r.getMessage().startswith(start)]


def test_debug_names_the_cause_of_every_non_200(gemini, proxy, caplog):
    caplog.set_level("DEBUG", logger="claude_gemini_proxy")
    overflow = "The input token count (1200293) exceeds the maximum number of tokens allowed (1048576)."
    gemini.script = [Reply(status=400, error=gemini_error(400, overflow)),
                     Reply(chunk(text("partial")), {"error": {"code": 503, "message": "high demand"}})]
    assert post(proxy, messages_body()).status == 400
    stream(proxy, messages_body())
    wait_for_log(caplog, "POST /v1/messages 529")
    said = debug_lines(caplog, "answering ")
    assert len(said) == 2 and said[0] == ("answering 400 invalid_request_error before any of the answer was sent: "
                                          "prompt is too long: 1200293 tokens > 1048576 maximum")
    cut = re.fullmatch(r"answering 529 overloaded_error as an SSE error event, the stream cut after (\d+) bytes "
                       r"of events: Gemini: high demand", said[1])
    assert cut and int(cut.group(1)) > len("event: message_start")
    assert "Gemini answered HTTP 400 for gemini-3.5-flash: prompt is too long" in "\n".join(
        debug_lines(caplog, "Gemini answered HTTP"))


def test_debug_names_the_safety_category_and_the_signature_carriers_left_out(gemini, proxy, caplog):
    caplog.set_level("DEBUG", logger="claude_gemini_proxy")
    refused = chunk(text(""), finish="SAFETY")
    refused["candidates"][0]["safetyRatings"] = [
        {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True},
        {"category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE"}]
    gemini.script = [Reply(refused)]
    assert post(proxy, messages_body()).json["stop_reason"] == "refusal"
    assert debug_lines(caplog, "Gemini stopped") == [
        "Gemini stopped: SAFETY (safety categories: HARM_CATEGORY_DANGEROUS_CONTENT)"]
    history = run_tool_rounds([proxy], gemini, rounds=1)[:-1]
    token = history[1]["content"][-1]["id"]
    tampered = token[:30] + ("A" if token[30] != "A" else "B") + token[31:]
    assert post(proxy, {"model": "gemini-3.1-pro-preview", "max_tokens": 100, "messages": history}).status == 200
    history[1]["content"][-1]["id"] = history[2]["content"][0]["tool_use_id"] = tampered
    assert post(proxy, {"model": "gemini-3.5-flash", "max_tokens": 100, "messages": history}).status == 200
    assert debug_lines(caplog, "signature carriers") == [
        "signature carriers not replayed to gemini-3.1-pro-preview: 1 issued by gemini-3.5-flash",
        "signature carriers not replayed to gemini-3.5-flash: 1 bad MAC (another key, another client's id, or "
        "altered)"]


# == Batches and files ========================================================

def multipart(parts, boundary="cgp-boundary-7MA4YWxkTrZu0gW"):
    """Return (body, content-type) for [(field name, filename or None, content type or None, bytes)]."""
    body = b""
    for name, filename, content_type, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if content_type:
            body += f"Content-Type: {content_type}\r\n".encode()
        body += b"\r\n" + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def upload(proxy, data, filename="notes.pdf", content_type="application/pdf", extra=()):
    body, ctype = multipart(list(extra) + [("file", filename, content_type, data)])
    return request(proxy, "POST", "/v1/files?beta=true", raw=body,
                   headers={"content-type": ctype, "anthropic-beta": "files-api-2025-04-14"})


def batch_request(custom_id, content="Hi", model="claude-sonnet-4-5-20250929", **extra):
    return {"custom_id": custom_id, "params": dict(messages_body(content, model=model), **extra)}


def create_batch(proxy, *requests):
    answer = post(proxy, {"requests": list(requests)}, path="/v1/messages/batches?beta=true")
    assert answer.status == 200, answer.raw
    return answer.json


def gemini_batch_names(proxy, batch_id):
    return cgp._decode_names(proxy.server.signatures.key, cgp.KIND_BATCH, batch_id[len("msgbatch_"):])


def results(proxy, batch_id):
    answer = request(proxy, "GET", f"/v1/messages/batches/{batch_id}/results")
    assert answer.status == 200, answer.raw
    assert answer.headers["transfer-encoding"] == "chunked"
    return [json.loads(line) for line in answer.raw.splitlines()]


def test_names_tokens_round_trip_and_refuse_tampering_other_keys_and_kinds():
    token = cgp._encode_names(b"key-one", cgp.KIND_BATCH, ["batches/a1", "batches/b2"])
    assert cgp.re.match(r"^[A-Za-z0-9_-]+$", token)
    assert token == cgp._encode_names(b"key-one", cgp.KIND_BATCH, ["batches/a1", "batches/b2"])
    assert cgp._decode_names(b"key-one", cgp.KIND_BATCH, token) == ["batches/a1", "batches/b2"]
    assert cgp._decode_names(b"key-two", cgp.KIND_BATCH, token) is None
    assert cgp._decode_names(b"key-one", cgp.KIND_FILE, token) is None
    flipped = token[:5] + ("A" if token[5] != "A" else "B") + token[6:]
    assert cgp._decode_names(b"key-one", cgp.KIND_BATCH, flipped) is None
    carrier = cgp._encode_carrier(b"key-one", cgp.Carried("m", cgp.KIND_CALL, "c", "sig"))
    assert cgp._decode_names(b"key-one", cgp.KIND_BATCH, carrier) is None
    assert cgp._decode_carrier(b"key-one", token) is None


@pytest.mark.parametrize("path, route, path_id", [
    ("/v1/messages/batches", "/v1/messages/batches", ""),
    ("/v1/messages/batches/msgbatch_x", "/v1/messages/batches/{id}", "msgbatch_x"),
    ("/v1/messages/batches/msgbatch_x/cancel", "/v1/messages/batches/{id}/cancel", "msgbatch_x"),
    ("/v1/messages/batches/msgbatch_x/results", "/v1/messages/batches/{id}/results", "msgbatch_x"),
    ("/v1/files/file_y/content", "/v1/files/{id}/content", "file_y"),
    ("/v1/models/gemini-3.5-flash", "/v1/models/{id}", "gemini-3.5-flash"),
    ("/v1/files/file_y/other", "", ""),
    ("/v1/messages/batches//cancel", "", ""),
])
def test_routes_match_path_templates(path, route, path_id):
    found, methods, found_id = cgp._match_route(path)
    assert (found, found_id) == (route, path_id)
    assert (methods is None) == (route == "")


def test_wrong_method_on_a_templated_route_is_405_with_allow(proxy):
    answer = request(proxy, "PUT", "/v1/files/file_abc")
    assert answer.status == 405 and answer.headers["allow"] == "GET, DELETE"


def test_upload_streams_in_chunks_and_a_message_can_use_the_file(gemini, proxy, monkeypatch):
    monkeypatch.setattr(cgp, "UPLOAD_CHUNK_BYTES", 256 * 1024)
    data = os.urandom(600_000) + b"\r\n--cgp-boundar"  # a near-boundary tail stays file data
    answer = upload(proxy, data, extra=[("purpose", None, None, b"ignored")])
    assert answer.status == 200, answer.raw
    meta = answer.json
    assert meta["id"].startswith("file_") and meta["type"] == "file" and meta["downloadable"] is False
    assert (meta["filename"], meta["mime_type"], meta["size_bytes"]) == ("notes.pdf", "application/pdf", len(data))
    assert meta["created_at"].endswith("Z") and meta["expires_at"] > meta["created_at"]
    (upload_state,) = gemini.uploads.values()
    assert upload_state["chunks"] == [262144, 262144, len(data) - 2 * 262144]  # never the whole file
    assert upload_state["declared"] is None and upload_state["display"] == "notes.pdf"
    name = upload_state["file"]
    assert gemini.file_bytes[name] == data and gemini.files[name]["mimeType"] == "application/pdf"
    starts = [r for r in gemini.requests if r[1] == "/upload/v1beta/files"]
    assert len(starts) == 1 and starts[0][2]["X-Goog-Upload-Protocol"] == "resumable"
    document = {"type": "document", "source": {"type": "file", "file_id": meta["id"]}}
    reply = post(proxy, messages_body([document, {"type": "text", "text": "Summarise"}]))
    assert reply.status == 200, reply.raw
    parts = gemini.bodies[-1]["contents"][-1]["parts"]
    assert parts[0] == {"fileData": {"mimeType": "application/pdf", "fileUri": gemini.files[name]["uri"]}}


def test_small_upload_declares_its_size_in_one_finalizing_chunk(gemini, proxy):
    answer = upload(proxy, b"hello world", filename="dir/a.txt", content_type=None)
    assert answer.status == 200, answer.raw
    assert (answer.json["filename"], answer.json["mime_type"]) == ("a.txt", "text/plain")
    (upload_state,) = gemini.uploads.values()
    assert upload_state["declared"] == 11 and upload_state["chunks"] == [11]
    finals = [r for r in gemini.requests if "upload_id=" in r[1]]
    assert len(finals) == 1 and finals[0][2]["X-Goog-Upload-Command"] == "upload, finalize"


@pytest.mark.parametrize("upload_answer, wording", [
    (b"[" * 100_000, "Gemini sent an upload answer the proxy could not read"),
    (b'{"file": "files/x"}', "Gemini's upload answer had no file"),
    (b'{"file": {"name": "files/abc", "displayName": "a\\udc00b", "mimeType": "text/plain", '
     b'"sizeBytes": "3", "createTime": "2026-12-01T10:00:00Z"}}', None),
])
def test_an_odd_upload_answer_is_a_502_or_a_clean_file(gemini, proxy, upload_answer, wording):
    gemini.upload_answer = upload_answer
    answer = upload(proxy, b"abc", filename="a.txt", content_type="text/plain")
    if wording:
        assert answer.status == 502 and answer.json["error"]["message"] == wording, answer.raw
    else:
        assert answer.status == 200 and answer.json["filename"] == "a\ufffdb", answer.raw  # repaired
    gemini.upload_answer = None
    assert upload(proxy, b"abc", filename="b.txt", content_type="text/plain").status == 200


def test_file_routes_get_list_pages_content_and_delete(gemini, proxy):
    ids = [upload(proxy, b"x" * i, filename=f"f{i}.txt", content_type="text/plain").json["id"] for i in (1, 2, 3)]
    gemini.add_file(b"{}", "application/jsonl", "claude_gemini_proxy:batch input")  # the proxy's own
    first = request(proxy, "GET", "/v1/files?beta=true&limit=2").json
    assert [f["id"] for f in first["data"]] == ids[:2] and first["has_more"] is True
    assert first["first_id"] == ids[0] and first["last_id"] == ids[1] and first["next_page"].startswith("page_")
    second = request(proxy, "GET", f"/v1/files?limit=2&page={first['next_page']}").json
    assert [f["id"] for f in second["data"]] == ids[2:] and second["has_more"] is False
    got = request(proxy, "GET", f"/v1/files/{ids[1]}")
    assert got.status == 200 and got.json["filename"] == "f2.txt" and got.json["size_bytes"] == 2
    content = request(proxy, "GET", f"/v1/files/{ids[1]}/content")
    assert content.status == 403 and "not downloadable" in content.json["error"]["message"]
    deleted = request(proxy, "DELETE", f"/v1/files/{ids[1]}")
    assert deleted.status == 200 and deleted.json == {"id": ids[1], "type": "file_deleted"}
    gone = request(proxy, "GET", f"/v1/files/{ids[1]}")
    assert gone.status == 404 and gone.json["error"]["type"] == "not_found_error"
    document = {"type": "document", "source": {"type": "file", "file_id": ids[1]}}
    used = post(proxy, messages_body([document]))  # Gemini answers 403 for a file it no longer has
    assert used.status == 400 and used.json["error"]["message"].startswith(
        "file_id: Gemini no longer has this file") and used.headers["x-should-retry"] == "false"
    assert request(proxy, "GET", "/v1/files?limit=0").status == 400


def test_upload_refuses_bodies_that_are_not_a_file(gemini, proxy):
    not_multipart = request(proxy, "POST", "/v1/files", {"file": "x"})
    assert not_multipart.status == 400 and "multipart/form-data" in not_multipart.json["error"]["message"]
    body, ctype = multipart([("purpose", None, None, b"x")])
    no_file = request(proxy, "POST", "/v1/files", raw=body, headers={"content-type": ctype})
    assert no_file.status == 400 and no_file.json["error"]["message"].startswith("file: field required")
    body, ctype = multipart([("file", "a.bin", None, b"abc")])
    cut = request(proxy, "POST", "/v1/files", raw=body[:-10], headers={"content-type": ctype})
    assert cut.status == 400 and "closing boundary" in cut.json["error"]["message"]
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:  # 3 GB declared
        sock.sendall(f"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                     f"Content-Length: {3 * 1024 ** 3}\r\n\r\n".encode())
        sock.shutdown(socket.SHUT_WR)
        head = sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 413") and b"request_too_large" in head
    assert not any(r[1].startswith("/upload/") and "upload_id" in r[1] for r in gemini.requests)


def test_forged_foreign_or_other_kind_ids_are_404_and_never_reach_gemini(gemini, proxy):
    other_key = cgp._encode_names(b"another key", cgp.KIND_BATCH, ["batches/abc"])
    mine = proxy.server.signatures.key
    as_file = cgp._encode_names(mine, cgp.KIND_FILE, ["batches/abc", "x", "9999999999", "u"])
    bad_name = cgp._encode_names(mine, cgp.KIND_BATCH, ["models/../files/abc"])
    batch_ids = ["msgbatch_", "msgbatch_abc", "msgbatch_" + other_key, "msgbatch_" + as_file,
                 "msgbatch_" + bad_name, "file_" + other_key]
    file_ids = ["file_", "file_abc", "file_" + other_key, "file_" + bad_name, "msgbatch_" + as_file]
    calls = [("GET", "/v1/messages/batches/{}"), ("DELETE", "/v1/messages/batches/{}"),
             ("POST", "/v1/messages/batches/{}/cancel"), ("GET", "/v1/messages/batches/{}/results")]
    files = [("GET", "/v1/files/{}"), ("DELETE", "/v1/files/{}"), ("GET", "/v1/files/{}/content")]
    tried = 0
    for ids, routes in ((batch_ids, calls), (file_ids, files)):
        for bad_id in ids:
            for method, path in routes:
                answer = request(proxy, method, path.format(bad_id), body={} if method == "POST" else None)
                assert answer.status == 404 and answer.json["error"]["type"] == "not_found_error", (method, path, bad_id)
                tried += 1
    assert tried == 6 * 4 + 5 * 3 and gemini.requests == []


def test_file_sources_become_file_data_and_foreign_or_expired_ids_are_400():
    store = cgp.SignatureStore(b"k" * 32)
    name, uri = "files/abc123", "https://generativelanguage.googleapis.com/v1beta/files/abc123"
    file_id = cgp._file_object(store.key, {"name": name, "mimeType": "image/png", "uri": uri,
                                          "createTime": "2099-01-01T00:00:00.123456789Z",
                                          "expirationTime": "2099-01-03T00:00:00Z"})["id"]
    image = {"type": "image", "source": {"type": "file", "file_id": file_id}}
    body = translate({"messages": [{"role": "user", "content": [image]}] + tool_loop_messages([image])[1:]},
                     store=store).body
    assert body["contents"][0]["parts"] == [{"fileData": {"mimeType": "image/png", "fileUri": uri}}]
    response = body["contents"][-1]["parts"][0]["functionResponse"]
    assert response["parts"] == [{"fileData": {"mimeType": "image/png", "fileUri": uri}}]
    expired = cgp._encode_names(store.key, cgp.KIND_FILE, [name, "image/png", "1000", uri])
    foreign = cgp._encode_names(b"other", cgp.KIND_FILE, [name, "image/png", "9999999999", uri])
    for bad, wording in (("file_" + expired, "expired at 1970-01-01T00:16:40Z"),
                         ("file_" + foreign, "not a file uploaded through this proxy"),
                         ("msgbatch_x", "not a file uploaded")):
        block = {"type": "document", "source": {"type": "file", "file_id": bad}}
        with pytest.raises(cgp.ProxyError) as raised:
            translate({"messages": [{"role": "user", "content": [block]}]}, store=store)
        assert raised.value.status == 400 and wording in raised.value.message
        assert raised.value.message.startswith("messages.0.content.0.source.file_id: ")


def test_batch_results_answer_head_with_no_body_and_http_1_0_without_chunks(gemini, proxy):
    batch = create_batch(proxy, batch_request("r0", "one"))
    (name,) = gemini_batch_names(proxy, batch["id"])
    gemini.script = [Reply(chunk(text("zero"), finish="STOP"))]
    gemini.end_batch(name)
    path = f"/v1/messages/batches/{batch['id']}/results".encode()
    replies = exchange(proxy, b"HEAD %s HTTP/1.1\r\nHost: x\r\n\r\n" % path + HEALTH, replies=2)
    assert [r.status for r in replies] == [200, 200] and replies[0].body == b""
    assert replies[1].body == b'{"status":"ok"}'  # no results body was read as the next answer
    replies = exchange(proxy, b"GET %s HTTP/1.0\r\n\r\n" % path)
    assert [r.status for r in replies] == [200] and "transfer-encoding" not in replies[0].headers
    assert [json.loads(line)["custom_id"] for line in replies[0].body.splitlines()] == ["r0"]


def test_batch_requests_translate_as_messages_do_and_results_map_back_by_key(gemini, proxy):
    tool = {"name": "get weather!", "input_schema": {"type": "object", "properties": {}}}
    requests = [batch_request("r0", "one"), batch_request("r1", "two", tools=[tool]),
                batch_request("r2", "three", stop_sequences=["a", "b", "c", "d", "e", "Stop"])]
    batch = create_batch(proxy, *requests)
    assert batch["id"].startswith("msgbatch_") and batch["type"] == "message_batch"
    assert batch["processing_status"] == "in_progress" and batch["results_url"] is None
    assert batch["request_counts"] == {"processing": 3, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
    assert batch["ended_at"] is None and batch["archived_at"] is None and batch["cancel_initiated_at"] is None
    (name,) = gemini_batch_names(proxy, batch["id"])
    inline = gemini.batches[name]["items"]
    config = make_config(gemini)
    for item, sent in zip(requests, inline):
        expected = cgp.to_gemini_request(item["params"], config, cgp.SignatureStore(b"k" * 32)).body
        assert sent["request"] == json.loads(json.dumps(expected))  # the /v1/messages translation
        assert json.loads(sent["metadata"]["key"])[0] == item["custom_id"]
    assert len(inline) == 3 and gemini.batches[name]["displayName"].startswith("claude_gemini_proxy:")
    assert request(proxy, "GET", f"/v1/messages/batches/{batch['id']}").json == batch
    gemini.script = [Reply(chunk(text("zero"), finish="STOP")),
                     Reply(chunk(call(cgp._gemini_tool_name("get weather!"), {}), finish="STOP")),
                     Reply(chunk(text("go Stop here"), finish="STOP"))]
    gemini.end_batch(name, reverse=True)  # Gemini's order is not the requests' order
    ended = request(proxy, "GET", f"/v1/messages/batches/{batch['id']}?beta=true").json
    assert ended["processing_status"] == "ended" and ended["ended_at"]
    assert ended["request_counts"]["succeeded"] == 3
    assert ended["results_url"] == f"http://127.0.0.1:{proxy.port}/v1/messages/batches/{batch['id']}/results"
    lines = {line["custom_id"]: line["result"] for line in results(proxy, batch["id"])}
    assert sorted(lines) == ["r0", "r1", "r2"] and all(r["type"] == "succeeded" for r in lines.values())
    again = {line["custom_id"]: line["result"]["message"]["id"] for line in results(proxy, batch["id"])}
    assert again == {custom_id: r["message"]["id"] for custom_id, r in lines.items()}  # stable ids
    assert len(set(again.values())) == 3
    assert lines["r0"]["message"]["content"] == [{"type": "text", "text": "zero"}]
    assert lines["r0"]["message"]["model"] == "claude-sonnet-4-5-20250929"
    assert lines["r1"]["message"]["content"][0]["name"] == "get weather!"  # renamed back
    assert lines["r1"]["message"]["stop_reason"] == "tool_use"
    assert lines["r2"]["message"]["stop_reason"] == "stop_sequence"  # the sixth, enforced by the fold
    assert lines["r2"]["message"]["content"] == [{"type": "text", "text": "go "}]


def test_a_batch_across_models_is_one_gemini_batch_per_model_under_one_id(gemini, proxy):
    file_id = upload(proxy, b"%PDF-1.4 x").json["id"]
    document = {"type": "document", "source": {"type": "file", "file_id": file_id}}
    batch = create_batch(proxy, batch_request("a"), batch_request("b", [document], model="gemini-3.1-pro-preview"),
                         batch_request("c"))
    names = gemini_batch_names(proxy, batch["id"])
    posted = [r[1] for r in gemini.requests if r[1].endswith(":batchGenerateContent")]
    assert posted == ["/v1beta/models/gemini-3.5-flash:batchGenerateContent",
                      "/v1beta/models/gemini-3.1-pro-preview:batchGenerateContent"]
    assert [len(gemini.batches[n]["items"]) for n in names] == [2, 1]
    (uri,) = [f["uri"] for f in gemini.files.values()]
    assert gemini.batches[names[1]]["items"][0]["request"]["contents"][0]["parts"] == [
        {"fileData": {"mimeType": "application/pdf", "fileUri": uri}}]  # file sources in batches too
    gemini.end_batch(names[0])
    half = request(proxy, "GET", f"/v1/messages/batches/{batch['id']}").json
    assert half["processing_status"] == "in_progress" and half["request_counts"]["processing"] == 3
    gemini.end_batch(names[1])
    done = request(proxy, "GET", f"/v1/messages/batches/{batch['id']}").json
    assert done["processing_status"] == "ended" and done["request_counts"]["succeeded"] == 3
    lines = results(proxy, batch["id"])
    assert sorted(line["custom_id"] for line in lines) == ["a", "b", "c"]
    assert {line["result"]["message"]["model"] for line in lines} == {"claude-sonnet-4-5-20250929",
                                                                     "gemini-3.1-pro-preview"}


def test_a_refused_model_part_removes_the_parts_already_created(gemini, proxy):
    gemini.refused_batch_models = {"gemini-3.1-pro-preview"}
    answer = post(proxy, {"requests": [batch_request("a"), batch_request("b", model="gemini-3.1-pro-preview")]},
                  path="/v1/messages/batches")
    assert answer.status == 429 and answer.json["error"]["type"] == "rate_limit_error"
    assert gemini.batches == {}  # the flash part was cancelled and deleted
    assert [r[0] for r in gemini.requests if r[1].startswith("/v1beta/batches/")] == ["POST", "DELETE"]


@pytest.mark.parametrize("state, answered, errors, expected, counts", [
    ("BATCH_STATE_SUCCEEDED", None, {1}, ["succeeded", "errored", "succeeded"], {"succeeded": 2, "errored": 1}),
    ("BATCH_STATE_FAILED", 0, (), ["errored", "errored", "errored"], {"errored": 3}),
    ("BATCH_STATE_CANCELLED", 1, (), ["succeeded", "canceled", "canceled"], {"succeeded": 1, "canceled": 2}),
    ("BATCH_STATE_EXPIRED", 0, (), ["expired", "expired", "expired"], {"expired": 3}),
])
def test_results_for_every_way_a_batch_ends(gemini, proxy, state, answered, errors, expected, counts):
    batch = create_batch(proxy, batch_request("x0"), batch_request("x1"), batch_request("x2"))
    (name,) = gemini_batch_names(proxy, batch["id"])
    gemini.end_batch(name, state, answered=answered, errors=errors)
    ended = request(proxy, "GET", f"/v1/messages/batches/{batch['id']}").json
    assert ended["processing_status"] == "ended"
    assert ended["request_counts"] == dict(dict.fromkeys(
        ("processing", "succeeded", "errored", "canceled", "expired"), 0), **counts)
    lines = sorted(results(proxy, batch["id"]), key=lambda line: line["custom_id"])
    assert [line["result"]["type"] for line in lines] == expected
    for line in lines:
        result = line["result"]
        if result["type"] == "errored":
            assert result["error"]["type"] == "error" and result["error"]["error"]["message"]
        if state == "BATCH_STATE_FAILED":
            assert "The batch failed: internal error." in result["error"]["error"]["message"]
    if errors:
        assert lines[1]["result"]["error"]["error"] == {"type": "invalid_request_error",
                                                        "message": "Gemini: request 1 was invalid"}


def test_a_batch_over_the_inline_limit_goes_as_a_jsonl_file(gemini, start_proxy):
    proxy = start_proxy(make_config(gemini, batch_inline_bytes=500))
    batch = create_batch(proxy, *[batch_request(f"big{i}", "x" * 200) for i in range(3)])
    (name,) = gemini_batch_names(proxy, batch["id"])
    source = gemini.batches[name]["inputConfig"]
    assert list(source) == ["fileName"]
    uploaded = gemini.files[source["fileName"]]
    assert uploaded["mimeType"] == "application/jsonl"
    assert uploaded["displayName"] == gemini.batches[name]["displayName"]
    lines = [json.loads(line) for line in gemini.file_bytes[source["fileName"]].splitlines()]
    assert [json.loads(line["key"])[0] for line in lines] == ["big0", "big1", "big2"]
    assert all(line["request"]["contents"][0]["parts"] == [{"text": "x" * 200}] for line in lines)
    gemini.end_batch(name, reverse=True)
    got = results(proxy, batch["id"])
    assert sorted(line["custom_id"] for line in got) == ["big0", "big1", "big2"]
    assert {line["result"]["message"]["content"][0]["text"] for line in got} == {"Answer 0.", "Answer 1.", "Answer 2."}
    assert any(r[1].endswith(":download?alt=media") for r in gemini.requests)
    assert request(proxy, "GET", "/v1/files").json["data"] == []  # batch input and output stay hidden


def test_a_result_file_with_lone_surrogates_and_junk_lines_still_maps_every_answer(gemini, start_proxy):
    proxy = start_proxy(make_config(gemini, batch_inline_bytes=500))
    batch = create_batch(proxy, *[batch_request(f"big{i}", "x" * 200) for i in range(3)])
    (name,) = gemini_batch_names(proxy, batch["id"])
    gemini.script = [Reply(chunk(text("broken \ud83d emoji"), finish="STOP"))]
    gemini.end_batch(name)
    output = gemini.batches[name]["output"]["responsesFile"]
    gemini.file_bytes[output] = (b"[" * 100_000 + b"\n" + gemini.file_bytes[output]
                                 + b"{" * 50 + b"\n")  # nested past the parser, and cut short
    got = {line["custom_id"]: line["result"] for line in results(proxy, batch["id"])}
    assert got["big0"]["message"]["content"][0]["text"] == "broken \ufffd emoji"
    assert [got[f"big{i}"]["message"]["content"][0]["text"] for i in (1, 2)] == ["Answer 1.", "Answer 2."]


class OnePieceUpstream:
    """A connection whose body arrives in one read: _lines() sees every line whole at once."""

    def __init__(self, body):
        self.sock, self.body = socket.socket(), body

    def read1(self, _size):
        body, self.body = self.body, b""
        return body

    def read(self):
        return b""


def test_a_line_past_the_limit_is_refused_even_when_it_arrives_in_one_piece(monkeypatch):
    monkeypatch.setattr(cgp, "MAX_SSE_LINE", 4096)
    upstream = OnePieceUpstream(b"ab\ncd\nef")
    with upstream.sock:
        assert list(cgp._lines(upstream, upstream, lambda: 60.0, lambda: 0.0)) == [b"ab\n", b"cd\n", b"ef"]
    upstream = OnePieceUpstream(b"x" * 10_000 + b"\n{}\n")
    with upstream.sock, pytest.raises(cgp.ProxyError, match="stream line longer than"):
        list(cgp._lines(upstream, upstream, lambda: 60.0, lambda: 0.0))


def test_a_result_file_line_past_the_size_limit_is_a_502(gemini, start_proxy, monkeypatch):
    monkeypatch.setattr(cgp, "MAX_SSE_LINE", 4096)
    proxy = start_proxy(make_config(gemini, batch_inline_bytes=500))
    batch = create_batch(proxy, batch_request("big", "x" * 600))
    (name,) = gemini_batch_names(proxy, batch["id"])
    gemini.end_batch(name)
    output = gemini.batches[name]["output"]["responsesFile"]
    gemini.file_bytes[output] = b"x" * 10_000 + b"\n" + gemini.file_bytes[output]
    answer = request(proxy, "GET", f"/v1/messages/batches/{batch['id']}/results")
    assert answer.status == 502 and "Gemini sent a stream line longer than" in answer.json["error"]["message"]
    assert request(proxy, "GET", "/health").status == 200


@pytest.mark.parametrize("requests, wording", [
    ([], "requests: must be a non-empty array"),
    ([batch_request("a"), batch_request("b", stream=True)], "requests.1 (custom_id 'b'): params.stream:"),
    ([batch_request("a"), batch_request("a")], "requests.1.custom_id: 'a' is used twice"),
    ([batch_request("bad id!")], "requests.0.custom_id: must be 1-64"),
    ([{"custom_id": "m", "params": {"model": "claude-x", "messages": [{"role": "robot", "content": "x"}]}}],
     "requests.0 (custom_id 'm'): params.messages.0.role:"),
])
def test_a_bad_request_makes_the_create_a_400_naming_it(gemini, proxy, requests, wording):
    answer = post(proxy, {"requests": requests}, path="/v1/messages/batches")
    assert answer.status == 400 and answer.json["error"]["message"].startswith(wording), answer.json
    assert gemini.requests == []


def test_batch_limits_are_anthropics(gemini, proxy, monkeypatch):
    monkeypatch.setattr(cgp, "MAX_BATCH_REQUESTS", 2)
    answer = post(proxy, {"requests": [batch_request(f"n{i}") for i in range(3)]}, path="/v1/messages/batches")
    assert answer.status == 400 and "at most 2 per batch" in answer.json["error"]["message"]
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/messages/batches HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % (300 * 1024 * 1024))
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(65536).startswith(b"HTTP/1.1 413")


def test_batch_list_shows_this_keys_batches_newest_first_with_paging(gemini, proxy, start_proxy):
    first = create_batch(proxy, batch_request("a"))
    second = create_batch(proxy, batch_request("b"), batch_request("c", model="gemini-3.1-pro-preview"))
    stranger = start_proxy(make_config(gemini, signature_key=b"s" * 32))
    theirs = create_batch(stranger, batch_request("z"))
    gemini.batches["batches/foreign"] = dict(gemini.batches[gemini_batch_names(proxy, first["id"])[0]],
                                             name="batches/foreign", displayName="someone else's job")
    listed = request(proxy, "GET", "/v1/messages/batches?beta=true").json
    assert [b["id"] for b in listed["data"]] == [second["id"], first["id"]]
    assert listed["has_more"] is False and listed["first_id"] == second["id"]
    page = request(proxy, "GET", "/v1/messages/batches?limit=1").json
    assert [b["id"] for b in page["data"]] == [second["id"]] and page["has_more"] is True
    after = request(proxy, "GET", f"/v1/messages/batches?limit=1&after_id={page['last_id']}").json
    assert [b["id"] for b in after["data"]] == [first["id"]] and after["has_more"] is False
    assert [b["id"] for b in request(stranger, "GET", "/v1/messages/batches").json["data"]] == [theirs["id"]]


def test_cancel_then_delete(gemini, proxy):
    batch = create_batch(proxy, batch_request("a"), batch_request("b"))
    (name,) = gemini_batch_names(proxy, batch["id"])
    early = request(proxy, "DELETE", f"/v1/messages/batches/{batch['id']}")
    assert early.status == 400 and "cancel it" in early.json["error"]["message"] and name in gemini.batches
    not_yet = request(proxy, "GET", f"/v1/messages/batches/{batch['id']}/results")
    assert not_yet.status == 400 and "has not ended" in not_yet.json["error"]["message"]
    gemini.cancel_async = True
    canceling = post(proxy, {}, path=f"/v1/messages/batches/{batch['id']}/cancel").json
    assert canceling["processing_status"] == "canceling" and canceling["cancel_initiated_at"]
    assert any(r[1] == f"/v1beta/{name}:cancel" for r in gemini.requests)
    gemini.end_batch(name, "BATCH_STATE_CANCELLED", answered=0)
    ended = request(proxy, "GET", f"/v1/messages/batches/{batch['id']}").json
    assert ended["processing_status"] == "ended" and ended["request_counts"]["canceled"] == 2
    assert [line["result"] for line in results(proxy, batch["id"])] == [{"type": "canceled"}] * 2
    deleted = request(proxy, "DELETE", f"/v1/messages/batches/{batch['id']}")
    assert deleted.json == {"id": batch["id"], "type": "message_batch_deleted"} and name not in gemini.batches
    gone = request(proxy, "GET", f"/v1/messages/batches/{batch['id']}")
    assert gone.status == 404 and gone.json["error"]["type"] == "not_found_error"


def test_odd_tool_changes_are_400s_naming_the_field_and_odd_metadata_never_crashes(gemini, proxy):
    for change, path in (
            ({"type": "tool_addition", "tool": {"type": "tool_reference", "name": ["WebFetch"]}}, "tool.name"),
            ({"type": "tool_addition", "tool": {"type": "tool_definition", "definition": {"name": {"x": 1}}}},
             "tool.definition.name"),
            ({"type": "tool_removal", "tool": "Bash"}, "tool"),
            ({"type": "tool_removal", "tool": {"type": "mcp_tool_reference", "name": "x"}}, "tool.server_name"),
            ({"type": "compaction", "content": None, "tool_changes": [{"type": "tool_addition"}]},
             "tool_changes.0.tool"),
            ({"type": "code_execution_tool_result", "tool_use_id": "s", "content": {
                "type": "code_execution_result", "return_code": "0"}}, "content.return_code")):
        answer = post(proxy, messages_body(messages=[{"role": "user", "content": [change]}]))
        assert answer.status == 400, (change, answer.raw)
        assert answer.json["error"]["message"].startswith(f"messages.0.content.0.{path}: "), answer.json
    assert gemini.bodies == []
    grounding = {"webSearchQueries": "abc", "groundingChunks": 5,
                 "groundingSupports": [{"segment": "x", "groundingChunkIndices": 3},
                                       {"segment": {"text": "Hi"}, "groundingChunkIndices": 3}]}
    gemini.script = [Reply(chunk(text("Hi"), finish="STOP", grounding=grounding, url_context=5))]
    tools = [{"type": "web_search_20250305", "name": "web_search"}, WEB_FETCH_TOOL]
    answer = post(proxy, messages_body("Hi", tools=tools))
    assert answer.status == 200, answer.raw
    assert [b["type"] for b in answer.json["content"]] == ["server_tool_use", "web_search_tool_result", "text"]
    assert answer.json["content"][0]["input"] == {"query": ""} and "citations" not in answer.json["content"][2]


def test_code_execution_in_history_goes_back_as_the_parts_gemini_made(gemini, proxy):
    use = {"type": "server_tool_use", "id": "srvtoolu_1", "name": "code_execution", "input": {"code": "print(2)"}}
    history = [
        {"role": "user", "content": "Run code."},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Running."}, use,
            {"type": "code_execution_tool_result", "tool_use_id": "srvtoolu_1", "content": {
                "type": "code_execution_result", "stdout": "2\n", "stderr": "", "return_code": 0, "content": []}},
            dict(use, id="srvtoolu_2", input={"code": "1/0"}),
            {"type": "code_execution_tool_result", "tool_use_id": "srvtoolu_2", "content": {
                "type": "code_execution_result", "stdout": "", "stderr": "ZeroDivisionError", "return_code": 1,
                "content": []}},
            dict(use, id="srvtoolu_3", input={"code": "while True: pass"}),
            {"type": "code_execution_tool_result", "tool_use_id": "srvtoolu_3", "content": {
                "type": "code_execution_tool_result_error", "error_code": "execution_time_exceeded"}},
            {"type": "server_tool_use", "id": "srvtoolu_4", "name": "web_search", "input": {"query": "q"}},
            {"type": "text", "text": "Done: 2."}]},
        {"role": "user", "content": "And again?"}]
    answer = post(proxy, messages_body(messages=history, tools=[CODE_TOOL]))
    assert answer.status == 200, answer.raw
    assert gemini.bodies[-1]["contents"][1] == {"role": "model", "parts": [
        {"text": "Running."},
        {"executableCode": {"language": "PYTHON", "code": "print(2)"}},
        {"codeExecutionResult": {"outcome": "OUTCOME_OK", "output": "2\n"}},
        {"executableCode": {"language": "PYTHON", "code": "1/0"}},
        {"codeExecutionResult": {"outcome": "OUTCOME_FAILED", "output": "ZeroDivisionError"}},
        {"executableCode": {"language": "PYTHON", "code": "while True: pass"}},
        {"codeExecutionResult": {"outcome": "OUTCOME_DEADLINE_EXCEEDED", "output": "execution_time_exceeded"}},
        {"text": "Done: 2."}]}


# == HTTP handler =============================================================

def test_health_needs_no_auth_and_never_calls_gemini(gemini, start_proxy):
    guarded = start_proxy(make_config(gemini, proxy_auth_token="s3cret"))
    answer = request(guarded, "GET", "/health")
    assert answer.status == 200 and answer.json == {"status": "ok"}
    assert gemini.requests == []


@pytest.mark.parametrize("headers,status", [
    ({}, 401), ({"x-api-key": "wrong"}, 401), ({"authorization": "Bearer wrong"}, 401),
    ({"x-api-key": "s3cret"}, 200), ({"authorization": "Bearer s3cret"}, 200),
])
def test_proxy_auth_token_guards_every_route(gemini, start_proxy, headers, status):
    guarded = start_proxy(make_config(gemini, proxy_auth_token="s3cret"))
    answer = post(guarded, messages_body(), headers=headers)
    assert answer.status == status
    if status == 401:
        assert answer.json["error"]["type"] == "authentication_error" and gemini.requests == []
        assert request(guarded, "GET", "/v1/models", headers=headers).status == 401
        assert post(guarded, messages_body(), "/v1/messages/count_tokens", headers=headers).status == 401


def test_a_401_is_logged_at_info_with_header_names_only(gemini, start_proxy, caplog):
    caplog.set_level("INFO", logger="claude_gemini_proxy")
    guarded = start_proxy(make_config(gemini, proxy_auth_token="s3cret"))
    answer = post(guarded, messages_body(), headers={"x-api-key": "wrong-value", "anthropic-version": "2023-06-01"})
    assert answer.status == 401
    lines = [r for r in caplog.records if r.getMessage().startswith("401: ")]
    assert len(lines) == 1 and lines[0].levelname == "INFO"
    assert '"anthropic-version"' in lines[0].getMessage() and '"x-api-key"' in lines[0].getMessage()
    assert "wrong-value" not in lines[0].getMessage() and "2023-06-01" not in lines[0].getMessage()


def test_client_credentials_never_go_upstream_and_key_never_in_url(gemini, proxy):
    post(proxy, messages_body(), headers={"x-api-key": "client-key", "authorization": "Bearer client-token",
                                          "anthropic-version": "2023-06-01", "anthropic-beta": "x"})
    method, path, headers, _ = gemini.requests[0]
    lower = {k.lower(): v for k, v in headers.items()}
    assert lower["x-goog-api-key"] == "test-key" and "authorization" not in lower
    assert "client" not in json.dumps(lower) and "anthropic-beta" not in lower
    assert "key" not in path.lower() and path == "/v1beta/models/gemini-3.5-flash:generateContent"


def test_beta_query_is_accepted_and_response_names_the_client_model(gemini, proxy):
    answer = post(proxy, messages_body(), path="/v1/messages?beta=true")
    assert answer.status == 200 and answer.json["model"] == "claude-sonnet-4-5-20250929"
    assert answer.headers["x-gemini-model"] == "gemini-3.5-flash"
    assert answer.headers["request-id"].startswith("req_")
    assert answer.json["content"] == [{"type": "text", "text": "Hello from Gemini."}]
    assert answer.json["id"].startswith("msg_") and answer.json["type"] == "message"


def test_unknown_path_is_404_and_wrong_method_is_405(proxy):
    missing = request(proxy, "GET", "/v1/nothing")
    assert missing.status == 404 and missing.json["error"]["type"] == "not_found_error"
    wrong = request(proxy, "GET", "/v1/messages")
    assert wrong.status == 405 and wrong.json["type"] == "error"
    assert request(proxy, "DELETE", "/v1/models").status == 405


def test_head_follows_get_rules_and_warm_up_needs_no_token(gemini, start_proxy):
    guarded = start_proxy(make_config(gemini, proxy_auth_token="s3cret"))
    for path, status in [("/", 200), ("/health", 200), ("/v1/models", 401), ("/metrics", 401),
                         ("/api/hello", 404), ("/v1/messages", 405)]:
        replies = exchange(guarded, b"HEAD %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode()
                           + HEALTH, replies=2)
        assert [r.status for r in replies] == [status, 200], path
        assert replies[0].body == b"" and int(replies[0].headers["content-length"]) > 0
    token = {"x-api-key": "s3cret"}
    assert request(guarded, "HEAD", "/v1/models", headers=token).status == 200


def test_bad_json_gets_400_and_next_request_works(gemini, proxy):
    answer = request(proxy, "POST", "/v1/messages", raw=b'{"model": ')
    assert answer.status == 400 and "not valid JSON" in answer.json["error"]["message"]
    assert post(proxy, messages_body()).status == 200


def test_body_over_limit_is_413_without_reading_it_into_memory(gemini, start_proxy):
    small = start_proxy(make_config(gemini, max_request_bytes=1000))
    answer = request(small, "POST", "/v1/messages", raw=b"x" * 5000)
    assert answer.status == 413 and answer.json["error"]["type"] == "request_too_large"
    assert gemini.requests == [] and post(small, messages_body()).status == 200


def test_garbage_request_line_gets_an_anthropic_shaped_400(proxy):
    (reply,) = exchange(proxy, b"THIS IS NOT HTTP\r\n\r\n")
    assert reply.status == 400 and json.loads(reply.body)["error"]["type"] == "invalid_request_error"
    assert request(proxy, "GET", "/health").status == 200


@pytest.mark.parametrize("method", [b"messages", b"health", b"count_tokens", b"serve_messages"])
def test_route_names_are_not_http_methods(proxy, caplog, method):
    (reply,) = exchange(proxy, method + b" / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.status == 501 and json.loads(reply.body)["type"] == "error"
    assert "Traceback" not in caplog.text and "TypeError" not in caplog.text
    assert request(proxy, "GET", "/health").status == 200


def test_keep_alive_serves_several_requests_on_one_connection(gemini, proxy):
    conn = proxy.connect()
    for _ in range(3):
        conn.request("POST", "/v1/messages", body=json.dumps(messages_body()),
                     headers={"content-type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read())["type"] == "message"
    conn.close()


def test_count_tokens_uses_gemini_count_tokens_with_system_and_tools(gemini, proxy):
    body = {"model": "claude-sonnet-4-5", "system": "sys prompt",
            "messages": [{"role": "user", "content": "foo"}],
            "tools": [{"name": "Read", "input_schema": {"type": "object"}}]}
    answer = post(proxy, body, path="/v1/messages/count_tokens?beta=true",
                  headers={"anthropic-beta": "token-counting-2024-11-01"})
    assert answer.status == 200 and answer.json["input_tokens"] > 0
    method, path, _, sent = gemini.requests[0]
    assert path == "/v1beta/models/gemini-3.5-flash:countTokens"
    inner = sent["generateContentRequest"]
    assert inner["model"] == "models/gemini-3.5-flash" and inner["systemInstruction"]["parts"][0]["text"] == "sys prompt"
    assert inner["tools"][0]["functionDeclarations"][0]["name"] == "Read"
    assert answer.json["input_tokens"] == len(json.dumps(sent)) // 4
    assert "x-token-count-estimated" not in answer.headers


def test_count_tokens_estimates_when_upstream_has_none(gemini, proxy):
    gemini.count_tokens_status = 404
    answer = post(proxy, {"model": "m", "messages": [{"role": "user", "content": "hello " * 100}]},
                  path="/v1/messages/count_tokens")
    assert answer.status == 200 and answer.headers["x-token-count-estimated"] == "true"
    assert 100 < answer.json["input_tokens"] < 400


def test_models_list_pages_gemini_and_adds_table_names(gemini, proxy):
    answer = request(proxy, "GET", "/v1/models?limit=1000")
    ids = [m["id"] for m in answer.json["data"]]
    assert ids[:2] == ["gemini-3.5-flash", "gemini-3.1-pro-preview"] and "embedding-001" not in ids
    assert {"Kimi-K2.5", "Claude Sonnet 4.6", "Claude Opus 4.6"} <= set(ids)
    flash = answer.json["data"][0]
    assert flash["type"] == "model" and flash["max_input_tokens"] == 1048576 and flash["max_tokens"] == 65536
    assert answer.json["first_id"] == ids[0] and answer.json["last_id"] == ids[-1] and not answer.json["has_more"]
    assert len([r for r in gemini.requests if r[0] == "GET"]) == 2  # both pages
    page = request(proxy, "GET", "/v1/models?limit=2")
    assert [m["id"] for m in page.json["data"]] == ids[:2] and page.json["has_more"]
    after = request(proxy, "GET", f"/v1/models?limit=2&after_id={ids[1]}")
    assert [m["id"] for m in after.json["data"]] == ids[2:4]
    before = request(proxy, "GET", f"/v1/models?limit=1&before_id={ids[2]}")
    assert [m["id"] for m in before.json["data"]] == [ids[1]]
    assert len([r for r in gemini.requests if r[0] == "GET"]) == 2  # cached


# What the SDK's ModelInfo (anthropic 2.x types/model_info.py, model_capabilities.py) requires.
MODEL_INFO_KEYS = {"type", "id", "display_name", "created_at", "lifecycle", "deprecated_at",
                   "max_input_tokens", "max_tokens", "capabilities"}
CAPABILITY_KEYS = {"batch", "citations", "code_execution", "context_management", "effort", "image_input",
                   "pdf_input", "server_tools", "structured_outputs", "thinking"}


def assert_model_info(model):
    """Check one model object against ModelInfo's fields and types, as strict SDK validation does."""
    assert set(model) == MODEL_INFO_KEYS, model
    assert model["type"] == "model" and model["lifecycle"] in ("active", "deprecated", "retired")
    assert model["created_at"].endswith("Z") and isinstance(model["display_name"], str)
    assert (model["deprecated_at"] is None) == (model["lifecycle"] == "active")
    caps = model["capabilities"]
    assert set(caps) == CAPABILITY_KEYS
    for key in ("batch", "citations", "code_execution", "image_input", "pdf_input", "structured_outputs"):
        assert set(caps[key]) == {"supported"} and isinstance(caps[key]["supported"], bool)
    assert set(caps["effort"]) == {"supported", "low", "medium", "high", "xhigh", "max"}
    assert set(caps["server_tools"]) == {"supported", "web_search", "code_execution"}
    assert set(caps["thinking"]) == {"supported", "types"}
    assert set(caps["thinking"]["types"]) == {"adaptive", "enabled", "disabled", "between_tools"}
    assert caps["context_management"] == {"supported": False}


def test_models_carry_lifecycle_and_capabilities_from_gemini_list(gemini, proxy):
    answer = request(proxy, "GET", "/v1/models?limit=1000")
    models = {m["id"]: m for m in answer.json["data"]}
    assert len(models) == 6 and "gemini-2.5-flash" not in models  # retired: only when asked
    for model in models.values():
        assert_model_info(model)
    flash, pro, gemma = models["gemini-3.5-flash"], models["gemini-3.1-pro-preview"], models["gemma-3-27b-it"]
    assert flash["lifecycle"] == "deprecated" and flash["deprecated_at"] == "2026-10-08T00:00:00Z"
    assert pro["lifecycle"] == "active" and pro["capabilities"]["thinking"]["supported"] is True
    assert pro["capabilities"]["image_input"] == {"supported": True}
    assert pro["capabilities"]["batch"] == {"supported": True}  # Gemini batches it, the proxy serves batches
    assert flash["capabilities"]["batch"] == {"supported": False}
    assert pro["capabilities"]["server_tools"]["web_search"] == {"supported": True}
    assert gemma["capabilities"]["thinking"]["supported"] is False
    assert gemma["capabilities"]["pdf_input"] == {"supported": False}
    assert gemma["capabilities"]["effort"]["high"] == {"supported": False}
    alias = models["Claude Opus 4.6"]  # a routing-table name describes the model it routes to
    assert alias["lifecycle"] == "deprecated" and alias["capabilities"] == flash["capabilities"]
    assert alias["display_name"] == "Claude Opus 4.6" and alias["max_tokens"] == 65536
    gets = [r[1] for r in gemini.requests if r[0] == "GET"]
    assert gets == ["/v1beta/models?pageSize=1000", "/v1beta/models?pageSize=1000&pageToken=p2"]


def test_lifecycle_query_filters_the_model_list(gemini, proxy):
    def ids(query):
        answer = request(proxy, "GET", "/v1/models?limit=1000&" + query)
        assert answer.status == 200, answer.raw
        return [m["id"] for m in answer.json["data"]]

    assert ids("lifecycle[]=retired") == ["gemini-2.5-flash"]  # the SDK's list encoding
    assert ids("lifecycle=deprecated") == ["gemini-3.5-flash", "Kimi-K2.5", "Claude Sonnet 4.6",
                                           "Claude Opus 4.6"]
    assert ids("lifecycle[]=active&lifecycle[]=retired") == ["gemini-3.1-pro-preview", "gemini-2.5-flash",
                                                             "gemma-3-27b-it"]
    assert len(ids("lifecycle=active,deprecated,retired")) == 7
    page = request(proxy, "GET", "/v1/models?lifecycle=active&limit=1")
    assert [m["id"] for m in page.json["data"]] == ["gemini-3.1-pro-preview"] and page.json["has_more"]
    bad = request(proxy, "GET", "/v1/models?lifecycle=gone")
    assert bad.status == 400 and "lifecycle" in bad.json["error"]["message"]
    retired = request(proxy, "GET", "/v1/models/gemini-2.5-flash")  # retrieve finds any stage
    assert retired.status == 200 and retired.json["lifecycle"] == "retired"
    assert_model_info(retired.json)
    assert len([r for r in gemini.requests if r[0] == "GET"]) == 2  # one cached list serves all


def test_get_one_model_or_404(gemini, proxy):
    assert request(proxy, "GET", "/v1/models/gemini-3.5-flash").json["id"] == "gemini-3.5-flash"
    assert request(proxy, "GET", "/v1/models/Claude%20Opus%204.6").json["id"] == "Claude Opus 4.6"
    missing = request(proxy, "GET", "/v1/models/nope")
    assert missing.status == 404 and missing.json["error"]["type"] == "not_found_error"


def test_malformed_function_call_is_retried_once_invisibly(gemini, proxy):
    gemini.script = [Reply(chunk(finish="MALFORMED_FUNCTION_CALL")),
                     Reply(chunk(call("Read", {"file_path": "/a"}), finish="STOP"))]
    answer = post(proxy, messages_body(tools=[{"name": "Read", "input_schema": {"type": "object"}}]))
    assert answer.status == 200 and answer.json["stop_reason"] == "tool_use"
    assert len(gemini.bodies) == 2
    gemini.script = [Reply(chunk(finish="MALFORMED_FUNCTION_CALL"))] * 2
    failed = post(proxy, messages_body())
    assert failed.status == 502 and failed.json["error"]["type"] == "api_error"


def test_debug_logs_redact_keys_and_base64(gemini, start_proxy, caplog):
    caplog.set_level("DEBUG", logger="claude_gemini_proxy")
    loud = start_proxy(make_config(gemini, api_keys=("AIzaSecretKey",), debug=True, proxy_auth_token="tok-123"))
    png = base64.b64encode(b"\x89PNG" * 50).decode()
    post(loud, messages_body([{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}},
                              {"type": "text", "text": "hi"}]), headers={"x-api-key": "tok-123"})
    deadline = time.monotonic() + 2
    while "/v1/messages 200" not in "\n".join(r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
        time.sleep(0.01)  # the access line is written just after the response
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "upstream POST" in logged and "/v1/messages 200" in logged
    assert "AIzaSecretKey" not in logged and "tok-123" not in logged and png[:40] not in logged


# -- Framing, bounds, injection -----------------------------------------------
# Raw sockets: what a hostile client (or a keep-alive pool shared by clients) sends.

HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


class RawReply:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body


def parse_replies(data, head_only=()):
    """Split raw bytes into replies (Content-Length or chunked framed); 1xx replies included."""
    replies = []
    while data:
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, head
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if status < 200 or len(replies) in head_only:
            body = b""
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size_line, _, data = data.partition(b"\r\n")
                size = int(size_line, 16)
                body, data = body + data[:size], data[size + 2:]
                if not size:
                    break
        elif "content-length" in headers:
            size = int(headers["content-length"])
            body, data = data[:size], data[size:]
        else:
            body, data = data, b""
        replies.append(RawReply(status, headers, body))
    return replies


def exchange(proxy, data, replies=None, timeout=5.0, head_only=None):
    """Send raw bytes; return the parsed replies once the proxy closed (or `replies` came)."""
    head_only = head_only if head_only is not None else (0,) if data.startswith(b"HEAD") else ()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout) as sock:
        sock.sendall(data)
        received = read_until(sock, lambda got: replies and _complete(got, replies, head_only))
    return parse_replies(received, head_only)


def _complete(received, count, head_only):
    try:
        return len(parse_replies(received, head_only)) >= count
    except (AssertionError, ValueError, IndexError):
        return False


def read_until(sock, done, deadline=5.0):
    """Return what the socket gave until `done(received)`, EOF or the deadline."""
    received, end = b"", time.monotonic() + deadline
    while not done(received) and time.monotonic() < end:
        try:
            piece = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not piece:
            break
        received += piece
    return received


def closed_by_peer(sock, within=2.0):
    sock.settimeout(within)
    try:
        return read_until(sock, lambda got: False, within) is not None and sock.recv(1) == b""
    except (ConnectionResetError, socket.timeout, OSError):
        return True


def wait_for(condition, within=2.0):
    """Return True once condition() holds (the handler finishes just after its answer)."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def inner_request(path, extra=b""):
    return b"GET %s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (path, extra)


@pytest.mark.parametrize("method,path,status", [
    (b"GET", b"/health", 200), (b"GET", b"/nothing", 404), (b"GET", b"/v1/messages", 405),
    (b"HEAD", b"/", 200), (b"POST", b"/v1/models", 405), (b"POST", b"/v1/messages", 401),
])
def test_unread_body_is_thrown_away_never_parsed_as_a_request(gemini, start_proxy, method,
                                                              path, status):
    guarded = start_proxy(make_config(gemini, proxy_auth_token="s3cret"))
    smuggled = inner_request(b"/metrics") + b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n" \
        b"x-api-key: s3cret\r\nContent-Length: 2\r\n\r\n{}"
    head = b"%s %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (method, path,
                                                                          len(smuggled))
    replies = exchange(guarded, head + smuggled + HEALTH, replies=2)
    assert [r.status for r in replies] == [status, 200]
    assert replies[1].body == b'{"status":"ok"}' and gemini.requests == []


def test_body_past_the_discard_limit_closes_the_connection(gemini, proxy):
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"GET /nothing HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n")
        sock.sendall(b"x" * 100000)
        replies = parse_replies(read_until(sock, lambda got: b"}}" in got))
        assert replies[0].status == 404 and replies[0].headers["connection"] == "close"
        sock.sendall(b"y" * 1000)  # it lingers: the rest is read and dropped, then EOF
        assert closed_by_peer(sock)


def test_a_body_trickling_past_the_discard_time_closes_the_connection(gemini, start_proxy):
    quick = start_proxy(make_config(gemini, discard_timeout=0.2))
    with socket.create_connection(("127.0.0.1", quick.port), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        started = time.monotonic()
        replies = parse_replies(read_until(sock, lambda got: b"}" in got))
        assert replies[0].status == 200 and replies[0].headers["connection"] == "close"
        assert time.monotonic() - started < 1.5 and closed_by_peer(sock)


@pytest.mark.parametrize("framing", [
    b"Content-Length: +2", b"Content-Length: 0_2", b"Content-Length:  2", b"Content-Length: 2 ",
    b"Content-Length: 2\r\nContent-Length: 3", b"Content-Length : 2", b"Content-Length: 0x2",
    b"Content-Length: \xb2", b"Transfer-Encoding: chunked\r\nContent-Length: 2",
    b"Transfer-Encoding: gzip", b"Transfer-Encoding: gzip, chunked", b" Folded: header",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked", b"No colon here",
])
def test_ambiguous_framing_is_400_and_close(gemini, proxy, framing):
    data = b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n%s\r\n\r\n{}" % framing + HEALTH
    replies = exchange(proxy, data)
    assert [r.status for r in replies] == [400], framing
    assert replies[0].headers["connection"] == "close" and gemini.requests == []
    assert json.loads(replies[0].body)["error"]["type"] == "invalid_request_error"


def test_duplicate_equal_content_length_is_one_value(gemini, proxy):
    body = json.dumps(messages_body()).encode()
    data = b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n" \
        b"Content-Length: %d\r\n\r\n%s" % (len(body), len(body), body)
    assert [r.status for r in exchange(proxy, data + HEALTH, replies=2)] == [200, 200]


def chunked(body, size=7):
    pieces = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def test_chunked_body_is_decoded_and_the_connection_goes_on(gemini, proxy):
    body = json.dumps(messages_body("chunked hello")).encode()
    data = b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    replies = exchange(proxy, data + chunked(body) + HEALTH, replies=2)
    assert [r.status for r in replies] == [200, 200]
    assert gemini.bodies[0]["contents"][0]["parts"][0]["text"] == "chunked hello"


@pytest.mark.parametrize("chunks,status", [
    (b"400\r\n" + b"x" * 1024 + b"\r\n0\r\n\r\n", 413), (b"+5\r\nhello\r\n0\r\n\r\n", 400),
    (b"5\r\nhelloXX0\r\n\r\n", 400), (b"zz\r\n", 400),
], ids=["over-limit", "plus-sign", "no-crlf", "not-hex"])
def test_chunked_body_over_limit_or_malformed_is_refused(gemini, start_proxy, chunks, status):
    small = start_proxy(make_config(gemini, max_request_bytes=1000))
    data = b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    replies = exchange(small, data + chunks + HEALTH, replies=2)
    assert [r.status for r in replies] == [status, 200] if status == 413 else [status]
    assert gemini.requests == []


def test_a_client_leaving_inside_a_chunked_body_is_no_proxy_failure(gemini, proxy, caplog):
    caplog.set_level("INFO", logger="claude_gemini_proxy")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"2\r\n{}\r\n0\r\nX-Trailer: cut")  # gone inside the trailer section
    assert wait_for(lambda: "POST /v1/messages 499" in caplog.text)  # the client left
    assert "Traceback" not in caplog.text and gemini.requests == []
    assert [r.status for r in exchange(proxy, HEALTH, replies=1)] == [200]


def test_post_without_length_is_411(gemini, proxy):
    replies = exchange(proxy, b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n\r\n" + HEALTH, 2)
    assert [r.status for r in replies] == [411, 200]


def test_expect_100_continue_comes_after_auth_and_size_checks(gemini, start_proxy):
    guarded = start_proxy(make_config(gemini, proxy_auth_token="s3cret", max_request_bytes=5000))
    body = json.dumps(messages_body()).encode()
    expect = b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n" \
        b"Content-Length: %d\r\n%s\r\n"
    for size, token, status in [(len(body), b"", 401), (6000, b"x-api-key: s3cret\r\n", 413)]:
        with socket.create_connection(("127.0.0.1", guarded.port), timeout=5) as sock:
            sock.sendall(expect % (size, token))
            replies = parse_replies(read_until(sock, lambda got: b"}}" in got))
            assert [r.status for r in replies] == [status]
            assert replies[0].headers["connection"] == "close"
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=5) as sock:
        sock.sendall(expect % (len(body), b"x-api-key: s3cret\r\n"))
        assert read_until(sock, lambda got: b"\r\n\r\n" in got) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        replies = parse_replies(read_until(sock, lambda got: b'"end_turn"' in got and
                                           got.endswith(b"}")))
        assert replies[0].status == 200 and len(gemini.bodies) == 1


def test_http_0_9_request_is_400_and_closed_at_once(proxy):
    started = time.monotonic()
    replies = exchange(proxy, b"GET /health\r\n")
    assert [r.status for r in replies] == [400] and time.monotonic() - started < 1


@pytest.mark.parametrize("line,status", [(b"GET /health HTTP/2.0", 505), (b"GET /health HTTP/1.2",
                                          400), (b"GET /health HTTP/1.1", 400)])
def test_bad_versions_and_a_missing_host_are_refused(proxy, line, status):
    assert [r.status for r in exchange(proxy, line + b"\r\n\r\n")] == [status]


def test_http_1_0_gets_its_answer_and_a_close(gemini, proxy):
    replies = exchange(proxy, b"GET /health HTTP/1.0\r\n\r\n" + HEALTH)
    assert [r.status for r in replies] == [200] and replies[0].headers["connection"] == "close"


@pytest.mark.parametrize("headers", [
    b"".join(b"X-H%d: v\r\n" % i for i in range(100)),  # 101 lines with Host
    b"X-A: %s\r\nX-B: %s\r\n" % (b"a" * 33000, b"b" * 33000),
    b"X-A: %s\r\n" % (b"a" * 70000),
], ids=["101-lines", "66-kib-in-two", "one-70-kib-line"])
def test_headers_past_100_lines_or_64_kib_are_431(proxy, headers):
    replies = exchange(proxy, b"GET /health HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert [r.status for r in replies] == [431] and replies[0].headers["connection"] == "close"


def test_100_headers_in_64_kib_are_served(proxy):
    headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 500) for i in range(99))
    replies = exchange(proxy, b"GET /health HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n" + HEALTH,
                       replies=2)
    assert [r.status for r in replies] == [200, 200]


def test_headers_trickled_past_header_timeout_get_408_and_close(gemini, start_proxy):
    quick = start_proxy(make_config(gemini, header_timeout=0.3))
    with socket.create_connection(("127.0.0.1", quick.port), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        for _ in range(4):  # a byte every 0.1 s does not reset the clock
            time.sleep(0.1)
            try:
                sock.sendall(b"X")
            except OSError:
                break
        replies = parse_replies(read_until(sock, lambda got: b"}}" in got))
        assert [r.status for r in replies] == [408] and replies[0].headers["connection"] == "close"
        assert time.monotonic() - started < 1.0 and closed_by_peer(sock)


def test_body_past_its_deadline_gets_408_and_close(gemini, start_proxy):
    quick = start_proxy(make_config(gemini, header_timeout=0.3))
    with socket.create_connection(("127.0.0.1", quick.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        started = time.monotonic()
        replies = parse_replies(read_until(sock, lambda got: b"}}" in got))
        assert [r.status for r in replies] == [408] and replies[0].headers["connection"] == "close"
        assert 0.3 < time.monotonic() - started < 1.2 and closed_by_peer(sock)
    assert gemini.requests == []


def test_idle_keep_alive_connection_closes_after_idle_timeout(gemini, start_proxy):
    quick = start_proxy(make_config(gemini, idle_timeout=0.3))
    with socket.create_connection(("127.0.0.1", quick.port), timeout=5) as sock:
        sock.sendall(HEALTH)
        assert b'{"status":"ok"}' in read_until(sock, lambda got: got.endswith(b"}"))
        started = time.monotonic()
        assert read_until(sock, lambda got: False, deadline=2) == b""  # closed without a word
        assert 0.25 < time.monotonic() - started < 1.0


def test_a_refused_body_is_freed_at_once_not_by_the_cycle_collector(gemini, proxy):
    deep = b"[" * 300_000 + b"]" * 300_000  # RecursionError inside json.loads
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        replies = exchange(proxy, b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: %d"
                           b"\r\n\r\n%s" % (len(deep), deep) + HEALTH, replies=2)
        assert [r.status for r in replies] == [400, 200]
        assert wait_for(lambda: proxy.server.active_requests == 0)
        gc.collect()
        cycles = [o for o in gc.garbage if isinstance(o, BaseException)]
        assert cycles == []  # an error in a cycle keeps its frames, and the body, alive
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def test_connections_past_max_connections_get_a_fast_529_and_close(gemini, start_proxy):
    capped = start_proxy(make_config(gemini, max_connections=2))
    held = [socket.create_connection(("127.0.0.1", capped.port), timeout=5) for _ in range(2)]
    for sock in held:
        sock.sendall(HEALTH)
        assert read_until(sock, lambda got: got.endswith(b"}")).startswith(b"HTTP/1.1 200")
    started = time.monotonic()
    replies = exchange(capped, HEALTH)
    assert [r.status for r in replies] == [529] and time.monotonic() - started < 0.5
    assert replies[0].headers["retry-after"] == "1" and replies[0].headers["connection"] == "close"
    assert json.loads(replies[0].body)["error"]["type"] == "overloaded_error"
    held.pop().close()
    assert wait_for(lambda: capped.server.connections == 1)
    assert [r.status for r in exchange(capped, HEALTH, replies=1)] == [200]
    assert capped.server.connections_refused == 1
    held[0].close()


def test_max_connections_default_leaves_an_upstream_socket_per_connection():
    assert cgp._max_connections_for(1024, 64) == (1024 - cgp.FD_RESERVE - 64) // 2
    assert cgp._max_connections_for(10, 64) == 1
    assert cgp.Config().max_connections == 0  # derived at start from ulimit -n


class FailingListener:
    """The listening socket, but accept() fails with EMFILE for a while, as at ulimit -n."""

    def __init__(self, sock, failures):
        self.sock, self.failures, self.calls = sock, failures, 0

    def accept(self):
        self.calls += 1
        if self.calls <= self.failures:
            raise OSError(errno.EMFILE, "Too many open files")
        return self.sock.accept()

    def __getattr__(self, name):
        return getattr(self.sock, name)


def test_accept_out_of_descriptors_backs_off_and_logs_once(gemini, proxy, caplog):
    failing = FailingListener(proxy.server.socket, failures=8)
    proxy.server.socket = failing
    with caplog.at_level("WARNING", logger="claude_gemini_proxy"):
        started = time.monotonic()
        replies = exchange(proxy, HEALTH, replies=1)  # waits while accept() fails, then served
        elapsed = time.monotonic() - started
    assert [r.status for r in replies] == [200] and failing.calls == 9
    assert elapsed >= 8 * cgp.ACCEPT_BACKOFF * 0.9  # rested between tries instead of spinning
    lines = [r.getMessage() for r in caplog.records if "accept()" in r.getMessage()]
    assert len(lines) == 2 and "Too many open files" in lines[0] and "works again" in lines[1]
    proxy.server.socket = failing.sock


def test_bodies_past_max_inflight_bytes_wait_then_get_529(gemini, start_proxy):
    body = json.dumps(messages_body("x" * 2000)).encode()
    assert len(body) + cgp.JSON_VALUE_BYTES * body.count(b",") < 2 * len(body)  # one fits
    tight = start_proxy(make_config(gemini, max_inflight_bytes=2 * len(body) - 1,
                                    inflight_wait=0.2))
    head = b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    with socket.create_connection(("127.0.0.1", tight.port), timeout=5) as slow:
        slow.sendall(head + body[:10])  # holds its declared length while it trickles
        deadline = time.monotonic() + 2
        while tight.server.inflight.held == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        refused = exchange(tight, head + body + HEALTH, replies=2)
        assert [r.status for r in refused] == [529, 200] and time.monotonic() - started >= 0.2
        assert refused[0].headers["retry-after"] == "1"
        slow.sendall(body[10:])
        assert parse_replies(read_until(slow, lambda got: b"end_turn" in got))[0].status == 200
    assert [r.status for r in exchange(tight, head + body, replies=1)] == [200]
    assert wait_for(lambda: tight.server.inflight.held == 0) and len(gemini.bodies) == 2


def test_json_that_would_parse_past_max_inflight_bytes_is_413(gemini, start_proxy):
    tight = start_proxy(make_config(gemini, max_inflight_bytes=100_000))
    flood = b"[" + b"{}," * 2000 + b"{}]"  # 6 KB of text, 2,001 dicts once parsed
    replies = exchange(tight, b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                       b"\r\n%s" % (len(flood), flood) + HEALTH, replies=2)
    assert [r.status for r in replies] == [413, 200] and gemini.requests == []
    assert wait_for(lambda: tight.server.inflight.held == 0)


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
@pytest.mark.parametrize("model", ["gemini-x\r\nSet-Cookie: session=attacker", "gemini-中文",
                                   "gemini-x\x7f", "claude-\x00"], ids=["crlf", "cjk", "del", "nul"])
def test_model_names_that_would_reach_a_header_unclean_are_400(gemini, proxy, path, model):
    answer = post(proxy, dict(messages_body(), model=model), path=path)
    assert answer.status == 400 and answer.json["error"]["type"] == "invalid_request_error"
    assert answer.json["error"]["message"].startswith("model: ")
    assert "set-cookie" not in answer.headers and gemini.requests == []


def test_log_lines_escape_what_they_quote_from_a_request(gemini, proxy, caplog):
    caplog.set_level("DEBUG", logger="claude_gemini_proxy")
    forged = "\n2026-01-01 00:00:00,000 INFO [req_x] POST /v1/messages 200"
    assert post(proxy, dict(messages_body(), model="gemini-x" + forged)).status == 400
    gemini.script = [Reply(status=400, error=gemini_error(400, "bad value" + forged))]
    assert post(proxy, messages_body()).status == 400
    replies = exchange(proxy, b"GET /v1/\x1b[2Jnothing\x01 HTTP/1.1\r\nHost: x\r\n\r\n", 1)
    assert [r.status for r in replies] == [404]
    lines = caplog.text.splitlines()
    assert lines and not any(line.startswith("2026-01-01") for line in lines)
    assert "\x1b" not in caplog.text and "\\x1b[2Jnothing\\x01" in caplog.text
    assert any("bad value\\n2026-01-01" in line for line in lines)


def test_metrics_escape_labels_and_give_only_answered_models_a_series(gemini, proxy):
    names = [f"gemini-made-up-{i}" for i in range(100)]
    gemini.retired.update(names)
    for name in names:
        assert post(proxy, dict(messages_body(), model=name)).status == 404
    assert post(proxy, dict(messages_body(), model='gemini-odd"name')).status == 200
    assert post(proxy, messages_body()).status == 200
    metrics = request(proxy, "GET", "/metrics").raw.decode()
    series = [line for line in metrics.splitlines() if line.startswith(
        "claude_gemini_proxy_requests_total{")]
    assert len(series) == 3, series  # two answered models and "other", never a series a name
    assert 'route="/v1/messages",status="404",model="other"} 100' in metrics
    assert 'model="gemini-odd\\"name"' in metrics and 'model="gemini-3.5-flash"' in metrics
    assert len(proxy.server.metrics.pending) <= cgp.MAX_MODEL_SERIES


def test_label_values_are_escaped_per_the_text_format():
    assert cgp._label_value('a"b\\c\nd') == 'a\\"b\\\\c\\nd' and cgp._label_value(200) == "200"


# -- Streaming ----------------------------------------------------------------

def test_stream_relays_text_as_it_arrives(gemini, proxy):
    # Gemini holds its last chunk until the client has seen the first delta.
    gemini.script = [Reply(chunk(text("Hel")), chunk(text("lo")), chunk(text(" there"), finish="STOP",
                           usage={"promptTokenCount": 30, "candidatesTokenCount": 3}), hold_after=2)]
    conn = proxy.connect()
    conn.request("POST", "/v1/messages", body=json.dumps(dict(messages_body(), stream=True)),
                 headers={"content-type": "application/json"})
    response = conn.getresponse()
    raw = b""
    try:
        while b"content_block_delta" not in raw:
            line = response.readline()
            assert line, "the stream ended before any delta arrived"
            raw += line
        assert not gemini.hold.is_set()  # the delta came while Gemini still held the rest
    finally:
        gemini.hold.set()
    raw += response.read()
    conn.close()
    events, message = read_sse(raw)
    assert message["content"] == [{"type": "text", "text": "Hello there"}]
    assert message["stop_reason"] == "end_turn" and message["usage"]["input_tokens"] == 30
    assert message["usage"]["output_tokens"] == 3
    assert gemini.requests[0][1].endswith(":streamGenerateContent?alt=sse")


def test_stream_of_thinking_and_parallel_tool_calls(gemini, proxy):
    signature = new_signature()
    gemini.script = [Reply(chunk(text("Let me look", thought=True)),
                           chunk(text("", thought=True, thoughtSignature=signature)),
                           chunk(text("Reading both.")),
                           chunk(call("Read", {"file_path": "/a"}, call_id="c1"), call("Read", {"file_path": "/b"}, call_id="c2")),
                           chunk(finish="STOP"))]
    events, message = stream(proxy, messages_body(thinking={"type": "enabled", "budget_tokens": 2000},
                                                  tools=[{"name": "Read", "input_schema": {"type": "object"}}]))
    assert [b["type"] for b in message["content"]] == ["thinking", "text", "tool_use", "tool_use"]
    assert message["content"][0]["thinking"] == "Let me look" and message["content"][0]["signature"]
    assert [b["input"] for b in message["content"][2:]] == [{"file_path": "/a"}, {"file_path": "/b"}]
    assert all(b["input"] == {} for b in (e["content_block"] for e in events if e["type"] == "content_block_start")
               if b["type"] == "tool_use")
    assert message["stop_reason"] == "tool_use"


def test_stream_mid_stream_error_becomes_sse_error(gemini, proxy):
    error = {"error": {"code": 503, "message": "high demand", "status": "UNAVAILABLE"}}
    gemini.script = [Reply(chunk(text("partial")), error)]
    events, _ = stream(proxy, messages_body())
    assert events[-1]["type"] == "error" and events[-1]["error"]["type"] == "overloaded_error"
    assert "message_stop" not in [e["type"] for e in events]


def test_close_delimited_upstream_stream_is_relayed(gemini, proxy):
    gemini.script = [Reply(chunk(text("closed ")), chunk(text("after"), finish="STOP"),
                           close_delimited=True)]
    _, message = stream(proxy, messages_body())
    assert message["content"] == [{"type": "text", "text": "closed after"}]
    assert message["stop_reason"] == "end_turn"
    assert post(proxy, messages_body()).status == 200  # the pool holds no dead connection


def test_fault_after_the_first_delta_ends_the_stream_with_an_sse_error(gemini, proxy, monkeypatch):
    gemini.script = [Reply(chunk(text("first")), chunk(text("second"), finish="STOP"))]
    feed = cgp.ResponseFold.feed

    def failing_feed(fold, piece):
        if fold.blocks:  # the first delta went out
            raise RuntimeError("injected fault")
        return feed(fold, piece)

    monkeypatch.setattr(cgp.ResponseFold, "feed", failing_feed)
    body = json.dumps(messages_body(stream=True)).encode()
    # exchange() reads until the proxy closes: one reply, a chunked body ending in its
    # terminating chunk, and nothing after it (a second status line would be another reply).
    (reply,) = exchange(proxy, b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: "
                        b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert reply.status == 200 and reply.headers["transfer-encoding"] == "chunked"
    decoded = reply.body
    events, _ = read_sse(decoded)
    assert [e["type"] for e in events][:3] == ["message_start", "content_block_start",
                                              "content_block_delta"]
    assert events[-1]["type"] == "error" and events[-1]["error"]["type"] == "api_error"
    assert request(proxy, "GET", "/health").status == 200


def test_stream_raw_json_error_tail_becomes_sse_error(gemini, proxy):
    tail = b'{\n  "error": {\n    "code": 429,\n    "message": "quota",\n    "status": "RESOURCE_EXHAUSTED"\n  }\n}\n'
    gemini.script = [Reply(chunk(text("partial")), tail=tail)]
    events, _ = stream(proxy, messages_body())
    assert events[-1]["type"] == "error" and events[-1]["error"]["type"] == "rate_limit_error"


def test_stream_truncated_or_reset_is_an_error_not_a_silent_stop(gemini, proxy):
    gemini.script = [Reply(chunk(text("partial")), cut=True)]
    events, _ = stream(proxy, messages_body())
    assert events[-1]["type"] == "error" and events[-1]["error"]["type"] == "api_error"
    gemini.script = [Reply(chunk(text("no finish reason")))]
    events, _ = stream(proxy, messages_body())
    assert events[-1]["type"] == "error"
    assert post(proxy, messages_body()).status == 200


def test_stream_upstream_error_before_first_chunk_is_plain_http_error(gemini, proxy):
    gemini.script = [Reply(status=429, error=gemini_error(429, "slow down", "RESOURCE_EXHAUSTED"))]
    answer = post(proxy, dict(messages_body(), stream=True))
    assert answer.status == 429 and answer.json["error"]["type"] == "rate_limit_error"


def test_http_1_0_stream_is_close_delimited_without_chunks(gemini, proxy):
    gemini.script = [Reply(chunk(text("one ")), chunk(text("two"), finish="STOP"))]
    body = json.dumps(dict(messages_body(), stream=True)).encode()
    replies = exchange(proxy, b"POST /v1/messages HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s"
                       % (len(body), body))
    assert [r.status for r in replies] == [200] and replies[0].headers["connection"] == "close"
    assert "transfer-encoding" not in replies[0].headers
    _, message = read_sse(replies[0].body)
    assert message["content"][0]["text"] == "one two"


def test_a_client_that_stops_reading_is_cut_and_stalls_no_other_stream(gemini, start_proxy):
    quick = start_proxy(make_config(gemini, write_timeout=1.0, ping_interval=0.1))
    flood = [chunk(text("x" * 30000)) for _ in range(200)]  # past any socket buffer
    gemini.script = [Reply(*flood, chunk(text("end"), finish="STOP"), hold_after=200),
                     Reply(chunk(text("ok"), finish="STOP"), before=0.8)]
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(("127.0.0.1", quick.port))
    payload = json.dumps(dict(messages_body(), stream=True)).encode()
    stuck.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                  % (len(payload), payload))  # and never reads
    try:
        assert wait_for(lambda: len(gemini.requests) == 1)
        started = time.monotonic()
        events, message = stream(quick, messages_body())
        assert message["content"][0]["text"] == "ok" and time.monotonic() - started < 1.5
        assert len([e for e in events if e["type"] == "ping"]) >= 4  # on time, every 0.1 s
        # The stuck stream ended on its write timeout while Gemini still held its answer.
        assert wait_for(lambda: quick.server.active_requests == 0, 3) and not gemini.hold.is_set()
    finally:
        gemini.hold.set()
        stuck.close()


def test_a_closed_socket_in_the_watch_list_does_not_hide_the_others():
    ours, theirs = socket.socketpair()
    closed, _ = socket.socketpair()
    closed.close()  # a stream whose handler closed its socket just after the list was copied
    aborted = []

    class Stream:
        last_write = 0.0

        def abort(self):
            aborted.append(self)

    left = Stream()
    theirs.close()
    cgp._StreamWatch(15.0).check([(Stream(), closed), (left, ours)], now=1.0)
    assert aborted == [left]
    ours.close()


def test_client_left_detection_watches_descriptors_past_1024():
    ours, theirs = socket.socketpair()
    high = socket.socket(fileno=os.dup2(ours.fileno(), 1500))
    ours.close()
    try:
        assert cgp._socket_states([high])[2] == {1500}  # writable, seen through poll()
        assert not cgp._client_left(high)
        theirs.close()
        readable, gone, _ = cgp._socket_states([high])
        assert 1500 in readable | gone and cgp._client_left(high)
    finally:
        high.close()


def test_stream_pings_while_gemini_is_silent(gemini, start_proxy):
    quick = start_proxy(make_config(gemini, ping_interval=0.1))
    gemini.script = [Reply(chunk(text("a")), chunk(text("b"), finish="STOP"), pause=0.5)]
    events, message = stream(quick, messages_body())
    assert "ping" in [e["type"] for e in events] and message["content"][0]["text"] == "ab"


def test_buffered_mode_replays_one_answer_and_pings_while_waiting(gemini, start_proxy):
    buffered = start_proxy(make_config(gemini, stream_mode="buffered", ping_interval=0.1))
    gemini.script = [Reply(chunk(text("whole answer"), finish="STOP"), before=0.5)]
    events, message = stream(buffered, messages_body())
    names = [e["type"] for e in events]
    assert names[0] == "message_start" and "ping" in names
    assert message["content"] == [{"type": "text", "text": "whole answer"}]
    assert gemini.requests[0][1].endswith(":generateContent")


@pytest.mark.parametrize("streamed", [True, False])
def test_every_stop_sequence_is_cut_by_the_proxy_without_waiting_for_gemini(gemini, proxy, streamed):
    # Gemini holds its last chunk until the client has its answer: only a proxy that stops
    # reading at the match can answer at all.
    gemini.script = [Reply(chunk(text("one two ST")), chunk(text("OP three")),
                           chunk(text("four"), finish="STOP"), hold_after=2)]
    body = messages_body(stop_sequences=["STOP", "b"])
    try:
        if streamed:
            _, message = stream(proxy, body)
        else:
            message = post(proxy, body).json
    finally:
        gemini.hold.set()
    assert message["content"] == [{"type": "text", "text": "one two "}]
    assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", "STOP")
    path, sent = gemini.requests[0][1], gemini.requests[0][3]
    assert ":streamGenerateContent" in path and "stopSequences" not in sent["generationConfig"]


def test_client_disconnect_mid_stream_stops_upstream_and_proxy_goes_on(gemini, proxy):
    gemini.script = [Reply(*[chunk(text(f"piece {i} ")) for i in range(40)], chunk(finish="STOP"), pause=0.05)]
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    payload = json.dumps(dict(messages_body(), stream=True)).encode()
    sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    assert b"content_block_delta" in sock.recv(65536) or b"content_block_delta" in sock.recv(65536)
    sock.close()
    deadline = time.monotonic() + 3
    while proxy.server.active_requests and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proxy.server.active_requests == 0  # stopped long before the 2 s the upstream needs
    assert post(proxy, messages_body()).status == 200


def test_stream_empty_answer_is_retried_before_anything_is_sent(gemini, proxy):
    gemini.script = [Reply(chunk(finish="MALFORMED_FUNCTION_CALL")), Reply(chunk(text("second try"), finish="STOP"))]
    events, message = stream(proxy, messages_body())
    assert message["content"] == [{"type": "text", "text": "second try"}]
    assert len(gemini.bodies) == 2


def test_one_message_delta_per_stream_carries_the_final_usage_with_thinking_tokens(gemini, proxy):
    def growing(n):
        return {"promptTokenCount": 900, "cachedContentTokenCount": 600, "candidatesTokenCount": n,
                "thoughtsTokenCount": 2 * n, "totalTokenCount": 900 + 3 * n}
    answer = [chunk(text("Plan.", thought=True), usage=growing(1)), chunk(text("Hel"), usage=growing(2)),
              chunk(text("lo"), finish="STOP", usage=growing(3))]
    gemini.script = [Reply(chunk(finish="MALFORMED_FUNCTION_CALL", usage=growing(9))), Reply(*answer),
                     Reply(*answer)]
    body = messages_body(thinking={"type": "adaptive"})
    events, message = stream(proxy, body)
    deltas = [e for e in events if e["type"] == "message_delta"]
    final = {"input_tokens": 300, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 600,
             "output_tokens": 9, "output_tokens_details": {"thinking_tokens": 6}}
    assert len(deltas) == 1 and deltas[0]["usage"] == final  # also after the retried empty answer
    sent = json.dumps(gemini.bodies[0], separators=(",", ":"), ensure_ascii=False).encode()
    assert events[0]["message"]["usage"]["input_tokens"] == len(sent) // 4  # from Gemini's body
    assert post(proxy, body).json["usage"] == final


# == Main: process life =======================================================

def start_process(gemini, tmp_path, **env):
    environment = dict(os.environ, GEMINI_API_KEY="test-key", GEMINI_API_BASE=gemini.base, PORT="0", **env)
    log_path = tmp_path / "proxy.log"
    with open(log_path, "w") as log_file:  # a file, not a pipe: a full pipe would stall the proxy
        child = subprocess.Popen([sys.executable, os.path.join(HERE, "claude_gemini_proxy.py")], cwd=tmp_path,
                                 env=environment, stderr=log_file)
    deadline = time.monotonic() + 10
    while "listening on" not in log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.01)
    port = int(log_path.read_text().split("listening on http://127.0.0.1:")[1].split(",")[0])
    return child, port


def test_sigterm_lets_a_stream_in_flight_finish_and_refuses_new_connections(gemini, tmp_path):
    child, port = start_process(gemini, tmp_path, SHUTDOWN_GRACE="10")
    # Gemini holds the stream after its first chunk until new connections are refused.
    gemini.script = [Reply(*[chunk(text(f"{i} ")) for i in range(6)], chunk(finish="STOP"),
                           hold_after=1)]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/v1/messages", body=json.dumps(dict(messages_body(), stream=True)),
                 headers={"content-type": "application/json"})
    response = conn.getresponse()
    first = response.readline()
    child.send_signal(15)
    refused, deadline = False, time.monotonic() + 5
    while not refused and time.monotonic() < deadline:  # poll for the listener to close
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            time.sleep(0.02)
        except OSError:
            refused = True
    gemini.hold.set()
    assert refused
    _, message = read_sse(first + response.read())
    assert message["content"][0]["text"] == "0 1 2 3 4 5 " and message["stop_reason"] == "end_turn"
    assert child.wait(timeout=10) == 0


CHECK_ENV = ("GEMINI_API_KEY", "GEMINI_API_BASE", "MODEL_MAP", "MODEL_FALLBACKS", "GEMINI_AUTH_COMMAND",
             "GEMINI_AUTH_TYPE", "PROXY_AUTH_TOKEN", "DEFAULT_GEMINI_MODEL", "HOST", "PORT", "DEBUG")


def run_check(monkeypatch, capsys, gemini, **env):
    """Run `--check` in-process; return (exit status, output lines)."""
    for name in CHECK_ENV + ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    for name, value in dict({"GEMINI_API_KEY": "test-key", "GEMINI_API_BASE": gemini.base}, **env).items():
        monkeypatch.setenv(name, value)
    status = cgp.main(["--check", "--env-file", os.devnull])
    return status, capsys.readouterr().out.splitlines()


def test_check_of_a_healthy_setup_passes_and_prints_claude_code_settings(gemini, monkeypatch, capsys):
    gemini.served_as["gemini-3.5-flash"] = "gemini-3.6-flash"
    status, lines = run_check(monkeypatch, capsys, gemini, GEMINI_API_KEY="test-key,key-two",
                              MODEL_MAP="claude-haiku-*=gemini-3.1-pro-preview", PROXY_AUTH_TOKEN="tok-secret")
    checks = lines[:lines.index("")]
    assert checks == [
        f"ok   base URL {gemini.base} answers",
        "ok   Gemini accepts key #1 of 2",
        "ok   Gemini accepts key #2 of 2",
        "ok   default model gemini-3.5-flash exists and generates (served as gemini-3.6-flash, 1048576 input tokens)",
        "ok   MODEL_MAP target gemini-3.1-pro-preview exists and generates (1048576 input tokens)",
        f"ok   count_tokens works ({gemini_count_of_check_prompt()} tokens)",
    ]
    assert status == 0
    settings = lines[lines.index("") + 1:]
    assert settings[0] == "Point Claude Code at this proxy:"
    assert "export ANTHROPIC_BASE_URL=http://127.0.0.1:8318" in settings
    assert 'export ANTHROPIC_AUTH_TOKEN="$PROXY_AUTH_TOKEN"' in settings
    assert "export ANTHROPIC_DEFAULT_HAIKU_MODEL=gemini-3.1-pro-preview" in settings
    assert "export ANTHROPIC_DEFAULT_SONNET_MODEL=gemini-3.5-flash" in settings
    assert "export CLAUDE_CODE_MAX_CONTEXT_TOKENS=1048576" in settings and settings[-1] == "claude"
    output = "\n".join(lines)
    assert "test-key" not in output and "key-two" not in output and "tok-secret" not in output
    assert [r[1].split("?")[0] for r in gemini.requests if r[0] == "POST"] == [
        "/v1beta/models/gemini-3.5-flash:generateContent", "/v1beta/models/gemini-3.1-pro-preview:generateContent",
        "/v1beta/models/gemini-3.5-flash:countTokens"]


def gemini_count_of_check_prompt():
    body = {"generateContentRequest": {"model": "models/gemini-3.5-flash", "contents": cgp.CHECK_PROMPT}}
    return len(json.dumps(body)) // 4


def test_check_names_a_bad_key_and_an_unknown_model_with_the_closest(gemini, monkeypatch, capsys):
    gemini.bad_keys.add("key-two")
    gemini.retired.add("gemini-3.5-flash-preview")
    status, lines = run_check(monkeypatch, capsys, gemini, GEMINI_API_KEY="test-key,key-two",
                              MODEL_FALLBACKS="gemini-3.5-flash=gemini-3.5-flash-preview")
    assert status == 1
    assert ("FAIL Gemini refuses key #2 of 2: Gemini rejected the proxy's API key: API key not valid. Please "
            "pass a valid API key. -> fix GEMINI_API_KEY (new keys: https://aistudio.google.com/apikey)") in lines
    failed = [line for line in lines if line.startswith("FAIL")]
    assert len(failed) == 2
    assert failed[1].startswith("FAIL MODEL_FALLBACKS model gemini-3.5-flash-preview does not exist at Gemini -> "
                                "model: Gemini does not serve gemini-3.5-flash-preview")
    assert "closest available: gemini-3.5-flash, gemini-3.1-pro-preview" in failed[1]
    assert "ok   count_tokens works" in "\n".join(lines) and "key-two" not in "\n".join(lines)


def test_check_of_an_unreachable_base_fails_and_says_what_to_set(gemini, monkeypatch, capsys):
    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{spare.getsockname()[1]}/v1beta"
    status, lines = run_check(monkeypatch, capsys, gemini, GEMINI_API_BASE=dead)
    assert status == 1
    assert lines[0].startswith(f"FAIL base URL {dead} does not answer: Gemini failed while connecting: "
                               "ConnectionRefusedError")
    assert lines[0].endswith("-> check GEMINI_API_BASE; behind a proxy set HTTPS_PROXY (and NO_PROXY); for a "
                             "private CA set SSL_CERT_FILE")
    assert lines[1:3] == ["", "Point Claude Code at this proxy:"]


def test_check_of_a_base_without_a_model_list_checks_the_models_by_generating(gemini, monkeypatch, capsys):
    gemini.model_list = False
    status, lines = run_check(monkeypatch, capsys, gemini)
    assert status == 0, lines
    assert lines[:3] == [f"ok   base URL {gemini.base} answers",
                         "ok   key #1 of 1: this base has no model list; see the models",
                         "ok   default model gemini-3.5-flash exists and generates"]
    assert "# CLAUDE_CODE_MAX_CONTEXT_TOKENS: the model list gave no input limit" in lines


def test_check_of_a_failing_token_command(gemini, monkeypatch, capsys):
    status, lines = run_check(monkeypatch, capsys, gemini, GEMINI_API_KEY="",
                              GEMINI_AUTH_COMMAND="echo 'ERROR: no active account' >&2; echo more >&2; exit 3")
    assert status == 1
    assert lines[0] == ("FAIL GEMINI_AUTH_COMMAND failed (exit 3): ERROR: no active account -> run the command "
                        "by hand and fix it (gcloud: `gcloud auth login`)")
    assert not gemini.requests


def test_check_goes_through_the_egress_proxy_and_hides_its_password(gemini, tunnel, monkeypatch, capsys):
    status, lines = run_check(monkeypatch, capsys, gemini, HTTP_PROXY=tunnel.url("me:pw-secret@"),
                              GEMINI_AUTH_COMMAND="echo token-1")
    assert status == 0, lines
    assert lines[:3] == ["ok   GEMINI_AUTH_COMMAND prints a token",
                         f"ok   base URL {gemini.base} through {tunnel.url('me:***@')} answers",
                         "ok   Gemini accepts the token of GEMINI_AUTH_COMMAND"]
    assert tunnel.connects and "pw-secret" not in "\n".join(lines)


def test_started_and_listening_quickly(gemini, tmp_path):
    started = time.monotonic()
    child, port = start_process(gemini, tmp_path)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        assert time.monotonic() - started < 2.0
    finally:
        child.terminate()
        child.wait(timeout=10)


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS")).split()[1])


class CannedGemini:
    """A minimal upstream for load: canned answers, no validation, so the proxy is the bottleneck."""

    def __init__(self):
        answer = json.dumps(chunk(text("ok"), finish="STOP")).encode()
        frames = b"data: " + answer + b"\r\n\r\n"
        self.plain = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
            len(answer), answer)
        self.sse = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n%s" % (
            len(frames), frames)
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.base = f"http://127.0.0.1:{self.listener.getsockname()[1]}/v1beta"
        threading.Thread(target=accept_forever, args=(self.listener, self.serve), daemon=True).start()

    def serve(self, conn):
        reader = conn.makefile("rb")
        try:
            while True:
                request_line = reader.readline()
                if not request_line:
                    return
                length = 0
                for line in iter(reader.readline, b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                reader.read(length)
                conn.sendall(self.sse if b"alt=sse" in request_line else self.plain)
        except OSError:
            return
        finally:
            conn.close()


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc to read RSS")
def test_soak_of_mixed_requests_keeps_memory_flat(tmp_path):
    upstream = CannedGemini()
    child, port = start_process(upstream, tmp_path)
    body = json.dumps(messages_body()).encode()
    streamed = json.dumps(dict(messages_body(), stream=True)).encode()

    def worker(count):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for i in range(count):
            kind = i % 10
            if kind == 9:  # a client that leaves mid-request
                with socket.create_connection(("127.0.0.1", port)) as sock:
                    sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(streamed), streamed))
                continue
            payload = b'{"model": ' if kind == 8 else streamed if kind % 3 == 0 else body
            conn.request("POST", "/v1/messages", body=payload, headers={"content-type": "application/json"})
            response = conn.getresponse()
            response.read()
            assert response.status == (400 if kind == 8 else 200)
        conn.close()

    def run(total):
        threads = [threading.Thread(target=worker, args=(total // 4,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    try:
        run(2000)  # warm up: pools, caches and allocator arenas reach their working size
        before = rss_kb(child.pid)
        run(10000)
        after = rss_kb(child.pid)
    finally:
        child.terminate()
        child.wait(timeout=10)
        upstream.listener.close()
    assert after - before < 5 * 1024, (before, after)


# == Claude Code on Gemini ===================================================
# The captured requests above, driven end to end.

def test_claude_code_main_request_reaches_gemini_cleanly(gemini, proxy):
    events, message = cc_stream(proxy, claude_code_request(CC_FIRST_MESSAGES))
    sent = gemini.bodies[0]
    assert declared(sent) == ["Bash", "ToolSearch"]  # deferred tools wait for a tool_reference
    assert [p["text"] for p in sent["systemInstruction"]["parts"]] == [CC_SYSTEM[1]["text"], CC_SYSTEM[2]["text"]]
    assert sent["contents"][0]["parts"][-1] == note(CC_FIRST_MESSAGES[1]["content"][0]["text"])
    assert "billing-header" not in json.dumps(sent) and "cache_control" not in json.dumps(sent)
    assert "device_id" not in json.dumps(sent) and "clear_thinking" not in json.dumps(sent)
    assert sent["generationConfig"]["thinkingConfig"] == {"thinkingLevel": "HIGH", "includeThoughts": True}
    assert sent["generationConfig"]["maxOutputTokens"] == 32000
    assert "$schema" not in json.dumps(sent["tools"]) and '"additionalProperties": false' in json.dumps(sent["tools"])
    assert events[0]["message"]["usage"]["input_tokens"] > 0  # Claude Code sizes compaction from it
    assert message["usage"]["input_tokens"] == 10


def test_tool_search_round_loads_and_calls_a_deferred_tool(gemini, proxy):
    gemini.script = [Reply(chunk(call("ToolSearch", {"query": "select:WebFetch", "max_results": 5}, call_id="ts1"),
                                 finish="STOP"))]
    _, first = cc_stream(proxy, claude_code_request(CC_FIRST_MESSAGES))
    search = first["content"][-1]
    assert search["name"] == "ToolSearch" and first["stop_reason"] == "tool_use"
    followup = CC_FIRST_MESSAGES + [
        {"role": "assistant", "content": first["content"]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": search["id"], "cache_control": {
            "type": "ephemeral"}, "content": [{"type": "tool_reference", "tool_name": "WebFetch"}]}]}]
    gemini.script = [Reply(chunk(call("WebFetch", {"url": "https://example.com", "prompt": "summarize"}),
                                 finish="STOP"))]
    _, second = cc_stream(proxy, claude_code_request(followup, tools=CC_TOOLS[:2] + [CC_WEBFETCH] + CC_TOOLS[2:]))
    sent = gemini.bodies[-1]
    assert declared(sent) == ["Bash", "ToolSearch", "WebFetch"]
    response = sent["contents"][-1]["parts"][0]["functionResponse"]
    assert response["name"] == "ToolSearch" and response["id"] == "ts1"
    assert response["response"] == {"result": "Tool WebFetch is now available to call."}
    assert second["content"][-1]["name"] == "WebFetch"
    assert second["content"][-1]["input"] == {"url": "https://example.com", "prompt": "summarize"}


CC_WEB_SEARCH = {"model": "gemini-3.5-flash", "max_tokens": 32000, "stream": True,
                 "system": [{"type": "text", "text": "You are an assistant for performing a web search tool use"}],
                 "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 8}],
                 "tool_choice": {"type": "auto"}, "output_config": {"effort": "high"},
                 "messages": [{"role": "user", "content": [
                     {"type": "text", "text": "Perform a web search for the query: capital of France"}]}]}


def test_web_search_is_answered_by_google_search_in_stream_form(gemini, proxy):
    grounding = {"webSearchQueries": ["capital of France"], "groundingChunks": [
        {"web": {"uri": "https://example.com/paris", "title": "Paris - Example"}},
        {"web": {"uri": "https://example.org/fr", "title": "France"}}]}
    gemini.script = [Reply(chunk(text("Paris is the capital of France.")),
                           chunk(text(""), finish="STOP", grounding=grounding))]
    _, message = cc_stream(proxy, CC_WEB_SEARCH)
    sent_method, sent_path = gemini.requests[0][:2]
    assert sent_path.endswith(":generateContent") and gemini.bodies[0]["tools"] == [{"googleSearch": {}}]
    assert "toolConfig" not in gemini.bodies[0]
    assert [b["type"] for b in message["content"]] == ["server_tool_use", "web_search_tool_result", "text"]
    assert message["content"][0]["input"] == {"query": "capital of France"}
    assert [r["url"] for r in message["content"][1]["content"]] == ["https://example.com/paris", "https://example.org/fr"]
    assert message["content"][2]["text"] == "Paris is the capital of France."
    assert message["usage"]["server_tool_use"] == {"web_search_requests": 1, "web_fetch_requests": 0}


def test_web_search_domain_filters_reach_the_prompt_and_forced_choice_is_no_400(gemini, proxy):
    body = dict(CC_WEB_SEARCH, stream=False, tool_choice={"type": "tool", "name": "web_search"},
                tools=[{"type": "web_search_20250305", "name": "web_search", "allowed_domains": ["python.org"],
                        "blocked_domains": ["spam.example"]}, CC_TOOLS[0]])
    answer = post(proxy, body, path=CC_PATH)
    assert answer.status == 200
    sent = gemini.bodies[0]
    assert sent["tools"] == [{"googleSearch": {}}]
    prompt = sent["systemInstruction"]["parts"][-1]["text"]
    assert "python.org" in prompt and "spam.example" in prompt


def test_structured_output_request_of_claude_code_gets_json_text(gemini, proxy):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "reason": {"type": "string"}},
              "required": ["ok", "reason"], "additionalProperties": False}
    gemini.script = [Reply(chunk(text('{"ok": true, "reason": "done"}'), finish="STOP"))]
    body = {"model": "gemini-3.5-flash", "max_tokens": 32000, "stream": True, "tools": [],
            "output_config": {"effort": "high", "format": {"type": "json_schema", "schema": schema}},
            "messages": [{"role": "user", "content": "Has the stopping condition been satisfied?"}]}
    _, message = cc_stream(proxy, body)
    assert json.loads(message["content"][0]["text"]) == {"ok": True, "reason": "done"}
    generation = gemini.bodies[0]["generationConfig"]
    assert generation["responseMimeType"] == "application/json" and generation["responseJsonSchema"] == schema
    assert "tools" not in gemini.bodies[0] and "toolConfig" not in gemini.bodies[0]


def test_count_tokens_as_claude_code_calls_it(gemini, proxy):
    body = {"model": "gemini-3.5-flash", "messages": [{"role": "user", "content": "foo"}], "tools": CC_TOOLS,
            "thinking": {"type": "adaptive"}}
    answer = post(proxy, body, path="/v1/messages/count_tokens?beta=true",
                  headers=dict(CC_HEADERS, **{"anthropic-beta": "token-counting-2024-11-01"}))
    assert answer.status == 200 and answer.json["input_tokens"] == len(json.dumps(gemini.bodies[0])) // 4
    assert declared(gemini.bodies[0]["generateContentRequest"]) == ["Bash", "ToolSearch"]


def test_prompt_prefix_is_byte_stable_from_turn_to_turn(gemini, proxy):
    messages = list(CC_FIRST_MESSAGES)
    raw_bodies = []
    for turn in range(3):
        gemini.script = [Reply(chunk(text("Let me check", thought=True, thoughtSignature=new_signature())),
                               chunk(call("Bash", {"command": f"ls {turn}"})), chunk(finish="STOP"))]
        _, message = cc_stream(proxy, claude_code_request(messages, billing=str(600 + turn)))
        raw_bodies.append(json.dumps(gemini.bodies[-1]))
        messages = messages + [{"role": "assistant", "content": message["content"]},
                               {"role": "user", "content": [{"type": "tool_result", "tool_use_id":
                                                             message["content"][-1]["id"], "content": f"out {turn}"}]}]
    for before, after in zip(gemini.bodies, gemini.bodies[1:]):
        for key in ("systemInstruction", "tools", "toolConfig", "generationConfig", "safetySettings"):
            assert json.dumps(before[key]) == json.dumps(after[key])
        previous = json.dumps(before["contents"])[:-1]
        assert json.dumps(after["contents"]).startswith(previous)  # earlier turns resent byte for byte
    assert all("cc_version" not in raw for raw in raw_bodies)


# A 30-turn session in the shapes Claude Code 2.1.197 sent (captures/session, trimmed): the first
# user turn is [<system-reminder>, prompt], a role:system agent list follows it, later prompts are
# strings, cache_control sits on the last block of the last message only (so that message is a block
# list this turn and a string the next), and a role:system task reminder joins the end of the
# history about every ten messages and stays where it was put.
CC197_SYSTEM = [
    {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197.fb6; cc_entrypoint=sdk-cli;"},
    {"type": "text", "text": "You are a Claude agent, built on Anthropic's Claude Agent SDK.",
     "cache_control": {"type": "ephemeral"}},
    {"type": "text", "text": "\nYou are an interactive agent that helps users with software engineering tasks.\n",
     "cache_control": {"type": "ephemeral"}}]
CC197_TOOLS = [
    {"name": "Bash", "description": "Executes a bash command and returns its output.", "input_schema": {
        "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "properties": {
            "command": {"description": "The command to execute", "type": "string"},
            "timeout": {"description": "Optional timeout in milliseconds (max 600000)", "type": "number"}},
        "required": ["command"], "additionalProperties": False}},
    {"name": "Read", "description": "Reads a file from the local filesystem.", "input_schema": {
        "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "properties": {
            "file_path": {"description": "The absolute path to the file to read", "type": "string"},
            "limit": {"type": "integer", "exclusiveMinimum": 0, "maximum": 9007199254740991}},
        "required": ["file_path"], "additionalProperties": False}},
    {"name": "Write", "description": "Writes a file to the local filesystem.", "input_schema": {
        "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "properties": {
            "file_path": {"type": "string"}, "content": {"type": "string"}},
        "required": ["file_path", "content"], "additionalProperties": False}}]
CC197_FIRST = [{"type": "text", "text": "<system-reminder>\nAs you answer the user's questions, you can use the "
                                        "following context:\n# currentDate\nToday's date is 2026-12-01.\n"
                                        "</system-reminder>\n\n"},
               {"type": "text", "text": "Create a file named notes.txt containing 'turn one'."}]
CC197_AGENTS = "Available agent types for the Agent tool:\n- claude: Catch-all for any task. (Tools: *)"
CC197_TASKS = ("The task tools haven't been used recently. If you're working on tasks that would benefit "
               "from tracking progress, consider using TaskCreate to add new tasks.\n")
CC197_HEADERS = {"anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,thinking-token-count-"
                                   "2026-05-13,context-management-2025-06-27,mid-conversation-system-2026-04-07,"
                                   "effort-2025-11-24", "anthropic-version": "2023-06-01", "x-api-key": "sk-test",
                 "user-agent": "claude-cli/2.1.197 (external, sdk-cli)", "x-app": "cli",
                 "x-claude-code-session-id": "76cfb5d7-0000-4000-8000-000000000000"}


def cc197_reply(turn, awaiting_result):
    """Return Gemini's scripted answer for a turn: tool rounds, text answers, a thinking round."""
    if awaiting_result:  # after a tool result: a text answer, signed on a trailing part as Gemini 3 does
        return Reply(chunk(text("Done.")), chunk(text("", thoughtSignature=new_signature()), finish="STOP"))
    thought = text("**Planning**\n\nI should handle the request directly.", thought=True,
                   thoughtSignature=new_signature())
    if turn % 6 == 4:  # a plain text answer between tool rounds, after some thinking
        return Reply(chunk(thought), chunk(text(f"Plain answer {turn}."), finish="STOP"))
    name, args = [("Write", {"file_path": f"/w/f{turn}.txt", "content": f"turn {turn}"}),
                  ("Bash", {"command": f"echo {turn}"}), ("Read", {"file_path": f"/w/f{turn}.txt"})][turn % 3]
    parts = [thought] if turn % 2 else [text("Let me do that."), thought]  # text before the call, too
    return Reply(chunk(*parts), chunk(call(name, args, call_id=f"c{turn}"), finish="STOP"))


def cc197_body(history):
    """Return the request for a history: cache_control on the last block of the last message only."""
    last = dict(history[-1])
    blocks = _blocks_of(last["content"])
    last["content"] = blocks[:-1] + [dict(blocks[-1], cache_control={"type": "ephemeral"})]
    return {"model": "claude-opus-4-8", "messages": history[:-1] + [last], "system": CC197_SYSTEM,
            "tools": CC197_TOOLS, "metadata": {"user_id": "{\"device_id\":\"2813\",\"session_id\":\"76cfb5d7\"}"},
            "max_tokens": 64000, "thinking": {"type": "adaptive"},
            "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
            "output_config": {"effort": "high"}, "stream": True}


def _blocks_of(content):
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def run_cc197_session(gemini, instances, turns=30):
    """Drive a Claude Code session; turn i goes to instances(i). Return the raw upstream bodies."""
    history = [{"role": "user", "content": CC197_FIRST}, {"role": "system", "content": CC197_AGENTS}]
    awaiting_result = False
    for turn in range(turns):
        gemini.script = [cc197_reply(turn, awaiting_result)]
        answer = post(instances(turn), cc197_body(history), path=CC_PATH, headers=CC197_HEADERS)
        assert answer.status == 200, answer.raw
        message = read_sse(answer.raw)[1]
        history.append({"role": "assistant", "content": message["content"]})
        tool = message["content"][-1]
        awaiting_result = tool["type"] == "tool_use"
        if awaiting_result:
            history.append({"role": "user", "content": [
                {"tool_use_id": tool["id"], "type": "tool_result", "content": f"ok {turn}"}]})
        else:
            history.append({"role": "user", "content": f"Next task {turn}."})
        if turn % 10 == 9:  # Claude Code's reminder, at the end of the history, then left in place
            history.append({"role": "system", "content": CC197_TASKS})
    return list(gemini.raw_bodies)


def test_thirty_claude_code_turns_through_two_instances_then_a_restart_extend_the_prompt(gemini, start_proxy):
    first, second = start_proxy(make_config(gemini)), start_proxy(make_config(gemini))
    restarted = []

    def instances(turn):
        if turn < 20:
            return (first, second)[turn % 2]
        if not restarted:
            first.stop()
            second.stop()
            restarted.append(start_proxy(make_config(gemini)))  # a fresh process: empty LRU
        return restarted[0]

    raw = run_cc197_session(gemini, instances)
    assert len(raw) == 30
    for turn, (before, after) in enumerate(zip(raw, raw[1:])):
        assert before.endswith(b"]}")  # contents is the last key
        assert after.startswith(before[:-2]), f"turn {turn + 1} rewrote the prompt of turn {turn}"
    last = gemini.bodies[-1]
    assert "systemInstruction" in last and len(last["systemInstruction"]["parts"]) == 2
    notes = [p["text"] for c in last["contents"] for p in c["parts"] if "system-message" in p.get("text", "")]
    assert len(notes) == 3 and sum(CC197_TASKS in n for n in notes) == 2  # each reminder once, in place
    thoughts = [p for c in last["contents"] for p in c["parts"] if p.get("thought")]
    assert thoughts and all(p["thoughtSignature"] in gemini.issued for p in thoughts)
    assert gemini.bypassed == 0 and "cc_version" not in raw[-1].decode()

