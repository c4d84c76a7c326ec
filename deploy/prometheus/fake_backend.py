"""A control backend that misbehaves, for deploy/prometheus/e2e.sh.

Usage: fake_backend.py MODE PORT JOB_URL
  results503  serves one every-second job; refuses every result with 503
  retry3600   the same, with `Retry-After: 3600`
  hang        serves the job list once, then never answers anything
"""
import http.server
import json
import sys
import threading
import time

mode, port, job_url = sys.argv[1], int(sys.argv[2]), sys.argv[3]
job = {
    "name": "tick",
    "schedule": {"kind": "cron", "expr": "* * * * * *"},
    "action": {"kind": "http", "method": "GET", "url": job_url},
}
pulls = 0
lock = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        global pulls
        with lock:
            pulls += 1
            first = pulls == 1
        if mode == "hang" and not first:
            time.sleep(3600)
        body = json.dumps({"jobs": [job]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        if mode == "hang":
            time.sleep(3600)
        self.send_response(503)
        if mode == "retry3600":
            self.send_header("retry-after", "3600")
        self.send_header("content-length", "0")
        self.end_headers()


server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
server.daemon_threads = True
server.serve_forever()
