#!/usr/bin/env python3
"""A logging reverse proxy for the agent runs (tests/agents/run_agents.sh): forwards every
request to mlxd unchanged, streams the answer back unchanged, and appends one JSON line per
request to a log: method, path, status, request body (as sent), and the answer's body (whole,
or the stream's text) so that a failed run shows what the agent sent and what it got.

    python3 tests/agents/log_proxy.py --listen 18500 --target http://127.0.0.1:18501 --log requests.jsonl
"""
import argparse
import http.client
import http.server
import json
import threading
import urllib.parse

LOCK = threading.Lock()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", type=int, required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--log", required=True)
    a = ap.parse_args()
    target = urllib.parse.urlparse(a.target)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def forward(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=3600)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "accept-encoding")}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(k, v)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            answer, client_left = bytearray(), False
            try:
                while True:
                    chunk = resp.read1(65536)
                    if not chunk:
                        break
                    answer += chunk
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                client_left = True  # the agent closed the connection (it cancelled the request)
            conn.close()
            try:
                sent = json.loads(body) if body else None
            except ValueError:
                sent = body.decode(errors="replace")
            line = {"method": self.command, "path": self.path, "status": resp.status, "request": sent,
                    "answer": answer.decode(errors="replace"), "client_left": client_left}
            with LOCK, open(a.log, "a") as f:
                f.write(json.dumps(line) + "\n")

        do_GET = do_POST = do_HEAD = do_DELETE = forward

    server = http.server.ThreadingHTTPServer(("127.0.0.1", a.listen), Handler)
    server.serve_forever()


if __name__ == "__main__":
    main()
