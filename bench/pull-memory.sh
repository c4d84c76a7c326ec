#!/usr/bin/env bash
# Peak RSS (VmHWM) of cronguard applying a control-backend job list of N jobs.
# Usage: bench/pull-memory.sh [BIN] [N]   (default: target/release/cronguard 100000)
# Serves the list from a small Python backend on 127.0.0.1:18095, starts the
# service on 127.0.0.1:18094 with a fresh database, waits until every job is
# active, and prints the peak and current RSS.
set -eu
bin=${1:-target/release/cronguard}; n=${2:-100000}
work=$(mktemp -d)
python3 - "$n" > "$work/jobs.json" <<'PY'
import json, sys
n = int(sys.argv[1])
jobs = [{"name": f"job-{i}", "schedule": {"kind": "cron", "expr": "0 3 * * *"},
         "action": {"kind": "http", "method": "GET", "url": f"http://127.0.0.1:9/hook/{i}"}} for i in range(n)]
print(json.dumps({"jobs": jobs}))
PY
ls -la "$work/jobs.json"
cat > "$work/serve.py" <<'PY'
import http.server, sys
body = open(sys.argv[1], "rb").read()
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        self.send_response(200); self.send_header("content-type", "application/json")
        self.send_header("etag", '"v1"'); self.send_header("content-length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0))); self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
http.server.ThreadingHTTPServer(("127.0.0.1", 18095), H).serve_forever()
PY
python3 "$work/serve.py" "$work/jobs.json" & spid=$!
CRONGUARD_BACKEND_TOKEN=t "$bin" serve --listen 127.0.0.1:18094 --database "$work/db" --backend-url http://127.0.0.1:18095/api --log warn --max-body-bytes 1024 --backend-max-body-bytes 104857600 & cpid=$!
for i in $(seq 120); do
  c=$(curl -s "127.0.0.1:18094/v1/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["jobs"]["active"])' 2>/dev/null || echo 0)
  [ "$c" = "$n" ] && break; sleep 1
done
echo "jobs active: $c after ${i}s"
grep -E "VmHWM|VmRSS" /proc/$cpid/status
kill $cpid $spid; wait 2>/dev/null; rm -rf "$work"
