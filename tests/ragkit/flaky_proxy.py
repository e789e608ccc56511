"""A tiny OpenAI-compatible HTTP server on loopback that misbehaves on purpose (run as its own process).

``python tests/ragkit/flaky_proxy.py --port P --fault 500 --times 2 [--upstream http://127.0.0.1:Q]``

The first ``--times`` POST requests get the fault (500: HTTP 500; slow: sleep ``--delay`` s then answer;
drop: close the connection unanswered; malformed: 200 with a body that is not JSON; empty: 200 with no
choices); later ones are forwarded to ``--upstream`` (a real server) or, without one, answered with a
fixed stand-in completion (for transport tests where the model's answer is not what is tested).
``GET /stats`` returns how many POSTs arrived. With ``--tokenizer DIR`` it also serves vLLM's ``POST /tokenize``
(prompt or messages in; tokens, count, max_model_len out) with that real tokenizer. It is a test tool, not a
model server.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STAND_IN_TEXT = "stand-in answer"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--fault", choices=("none", "500", "slow", "drop", "malformed", "empty"), default="none")
    p.add_argument("--times", type=int, default=0, help="how many POSTs get the fault (-1: all)")
    p.add_argument("--delay", type=float, default=5.0)
    p.add_argument("--upstream", default=None, help="http://host:port of a real server to forward to")
    p.add_argument("--model", default="stand-in")
    p.add_argument("--usage-prompt-tokens", type=int, default=None, help="stand-in: usage.prompt_tokens to report")
    p.add_argument("--tokenizer", default=None, help="a tokenizer directory: serve POST /tokenize like vLLM")
    p.add_argument("--max-model-len", type=int, default=2048)
    args = p.parse_args()
    tokenizer = template = None
    if args.tokenizer:  # tokenizers + jinja2 directly: a light process, as vLLM's endpoint needs no model
        from pathlib import Path

        import jinja2
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(Path(args.tokenizer) / "tokenizer.json"))
        template = jinja2.Environment().from_string((Path(args.tokenizer) / "chat_template.jinja").read_text())
    lock = threading.Lock()
    posts = [0]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a: object) -> None:  # quiet
            pass

        def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _forward(self, method: str, data: bytes | None) -> None:
            req = urllib.request.Request(args.upstream + self.path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=600) as r:
                    self._send(r.status, r.read(), r.headers.get("Content-Type", "application/json"))
            except urllib.error.HTTPError as e:
                self._send(e.code, e.read())

        def _tokenize(self, body: dict) -> None:
            if tokenizer is None:
                return self._send(404, b'{"detail": "Not Found"}')
            if "messages" in body:
                text = template.render(messages=body["messages"], add_generation_prompt=body.get("add_generation_prompt"))
                ids = tokenizer.encode(text, add_special_tokens=False).ids
            else:
                ids = tokenizer.encode(body["prompt"], add_special_tokens=body.get("add_special_tokens", True)).ids
            self._send(200, json.dumps({"count": len(ids), "max_model_len": args.max_model_len, "tokens": ids}).encode())

        def do_GET(self) -> None:
            if self.path == "/stats":
                self._send(200, json.dumps({"posts": posts[0]}).encode())
            elif args.upstream:
                self._forward("GET", None)
            elif self.path == "/v1/models":
                self._send(200, json.dumps({"object": "list", "data": [{"id": args.model, "object": "model"}]}).encode())
            else:
                self._send(404, b'{"detail": "Not Found"}')

        def do_POST(self) -> None:
            data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path == "/tokenize":
                return self._tokenize(json.loads(data))
            with lock:
                posts[0] += 1
                faulty = args.times < 0 or posts[0] <= args.times
            if faulty and args.fault == "500":
                return self._send(500, b'{"error": "injected failure"}')
            if faulty and args.fault == "drop":
                self.close_connection = True
                self.connection.shutdown(2)
                return None
            if faulty and args.fault == "malformed":
                return self._send(200, b"this is not json {")
            if faulty and args.fault == "empty":
                return self._send(200, json.dumps({"id": "x", "object": "text_completion", "created": 0,
                                                   "model": args.model, "choices": []}).encode())
            if faulty and args.fault == "slow":
                time.sleep(args.delay)
            if args.upstream:
                return self._forward("POST", data)
            body = json.loads(data or b"{}")
            usage = {"completion_tokens": 2, "total_tokens": 2}
            if args.usage_prompt_tokens is not None:
                usage.update(prompt_tokens=args.usage_prompt_tokens,
                             total_tokens=args.usage_prompt_tokens + 2)
            if self.path.endswith("/chat/completions"):
                choice = {"index": 0, "message": {"role": "assistant", "content": STAND_IN_TEXT}, "finish_reason": "stop"}
            else:
                choice = {"index": 0, "text": STAND_IN_TEXT, "finish_reason": "stop"}
            return self._send(200, json.dumps({"id": "x", "object": "text_completion", "created": 0,
                                               "model": body.get("model"), "choices": [choice], "usage": usage}).encode())

    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
