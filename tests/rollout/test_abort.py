"""A preemption request aborts a running rollout within about a second (no SGLang needed: a stand-in
HTTP server whose /generate only returns once /abort_request was called, as SGLang's does)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipeline.rollout import RolloutAborted, RolloutConfig, SamplingParams
from pipeline.rollout.sglang_engine import SGLangEngine


def stand_in_server():
    aborted = threading.Event()
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
            seen.append(self.path)
            if self.path == "/generate":
                aborted.wait(60)  # a long generation, cut short by the abort
                out = [{"output_ids": [], "meta_info": {"finish_reason": {"type": "abort"}}}
                       for _ in body["input_ids"]]  # fmt: skip
            else:
                aborted.set() if self.path == "/abort_request" else None
                out = {"success": True}
            data = json.dumps(out).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


def test_an_abort_request_stops_the_rollout_within_seconds():
    server, seen = stand_in_server()
    try:
        engine = SGLangEngine.attach(
            RolloutConfig(model_path="m", batch_size=2), [f"http://127.0.0.1:{server.server_port}"]
        )
        asked = time.monotonic() + 1.5
        engine.abort_check = lambda: time.monotonic() > asked  # "preemption requested" after 1.5 s
        t0 = time.monotonic()
        with pytest.raises(RolloutAborted):
            engine.generate([[1, 2, 3]] * 6, SamplingParams(max_new_tokens=4))
        assert time.monotonic() - t0 < 10
        assert (
            seen.count("/generate") == 3 and "/abort_request" in seen
        )  # all requests were in flight at once
    finally:
        server.shutdown()
