#!/usr/bin/env bash
# End-to-end check with a real Prometheus server (Debian's `prometheus`):
#  1. start cronguard (a build with the `fault-injection` feature, e.g. the
#     binary `cargo test` leaves in target/debug);
#  2. `promtool check metrics` on a real scrape;
#  3. Prometheus scrapes it every second with deploy/prometheus/alerts.yml;
#  4. the engine loop is made to hang; the CronguardLoopStale expression
#     must return the engine's series and the alert must become active;
#     so must CronguardJobLate for the monitored job (its `for` cut to
#     0s in a copy of the rules), its labels naming the cronguard job
#     (`job_name`) beside the scrape job (`job`);
#  5. three more instances talk to misbehaving control backends
#     (fake_backend.py): a full hang, the results endpoint down alone, and
#     `Retry-After: 3600`. CronguardBackendResultsUndelivered must become
#     active for each (and CronguardBackendPullStale for the hang) within
#     the staleness bound these flags give (3 × 1s + 1s).
# Usage: deploy/prometheus/e2e.sh [path/to/cronguard]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${1:-target/debug/cronguard}
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Waits up to $2 seconds for command $1 to succeed.
wait_for() {
  local deadline=$((SECONDS + $2))
  until eval "$1" >/dev/null 2>&1; do
    if (( SECONDS > deadline )); then echo "timed out waiting for: $1" >&2; return 1; fi
    sleep 0.5
  done
}

port=$(free_port)
"$bin" serve --listen "127.0.0.1:$port" --database "$work/cronguard.db" \
  --loop-stale-after 2s --log warn >"$work/cronguard.log" 2>&1 &
pids+=($!)
base="http://127.0.0.1:$port"
wait_for "curl -sf $base/readyz" 30
curl -sf -X POST "$base/v1/jobs" -H 'content-type: application/json' \
  -d '{"name":"tick","monitor":true,"schedule":{"kind":"cron","expr":"* * * * * *"},"policy":{"misfire_grace":"1s"},"action":{"kind":"http","method":"GET","url":"'"$base"'/livez"}}' >/dev/null
sleep 2

echo "== three instances with misbehaving control backends"
backend_targets=()
declare -A scenario_port
for mode in hang results503 retry3600; do
  bport=$(free_port)
  cport=$(free_port)
  python3 "$here/fake_backend.py" "$mode" "$bport" "http://127.0.0.1:$cport/livez" >"$work/backend-$mode.log" 2>&1 &
  pids+=($!)
  CRONGUARD_BACKEND_TOKEN=e2e-token "$bin" serve --listen "127.0.0.1:$cport" --database "$work/$mode.db" \
    --backend-url "http://127.0.0.1:$bport/api" --backend-poll-interval 1s --backend-timeout 1s \
    --log warn >"$work/cronguard-$mode.log" 2>&1 &
  pids+=($!)
  scenario_port[$mode]=$cport
  backend_targets+=("\"127.0.0.1:$cport\"")
  wait_for "curl -sf http://127.0.0.1:$cport/readyz" 30
done

echo "== promtool check metrics"
curl -sf "$base/metrics" | promtool check metrics
echo "ok"

echo "== Prometheus scrapes cronguard"
# The shipped rules, with CronguardJobLate's two-minute hold cut to 0s.
python3 - "$here/alerts.yml" "$work/alerts.yml" <<'PY'
import re, sys
rules = open(sys.argv[1]).read()
cut, n = re.subn(r"(alert: CronguardJobLate\n\s+expr: .+\n\s+for: )2m", r"\g<1>0s", rules)
assert n == 1, "CronguardJobLate with for: 2m not found"
open(sys.argv[2], "w").write(cut)
PY
prom_port=$(free_port)
cat >"$work/prometheus.yml" <<YAML
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - $work/alerts.yml
scrape_configs:
  - job_name: cronguard
    static_configs:
      - targets: ["127.0.0.1:$port"]
  - job_name: cronguard-backend
    static_configs:
      - targets: [$(IFS=,; echo "${backend_targets[*]}")]
YAML
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/data" \
  --web.listen-address="127.0.0.1:$prom_port" >"$work/prometheus.log" 2>&1 &
pids+=($!)
prom="http://127.0.0.1:$prom_port"
wait_for "curl -sf $prom/-/ready" 60

query() {
  curl -sf --get "$prom/api/v1/query" --data-urlencode "query=$1" \
    | python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(" ".join(sorted(x["metric"].get("loop","-")+"="+x["value"][1] for x in r)))'
}
wait_for '[ "$(query "up{job=\"cronguard\"}")" = "-=1" ]' 60
echo "scraped: $(query 'cronguard_loop_healthy')"
[ -z "$(query 'cronguard_loop_healthy == 0')" ] || { echo "a loop is unhealthy before the fault" >&2; exit 1; }

echo "== the engine loop hangs"
curl -sf -X POST "$base/debug/faults" -H 'content-type: application/json' -d '{"target":"engine","fault":"hang"}'
expr=$(python3 -c 'import sys,re; t=open(sys.argv[1]).read(); print(re.search(r"alert: CronguardLoopStale\s+expr: (.+)", t).group(1).strip())' "$here/alerts.yml")
echo "alert expression: $expr"
wait_for '[ "$(query "$expr")" = "engine=0" ]' 60
echo "expression returns: $(query "$expr")"
wait_for 'curl -sf "$prom/api/v1/alerts" | grep -q "\"alertname\":\"CronguardLoopStale\""' 60
echo "CronguardLoopStale is active"
# The monitored job's expected-by stopped moving with the engine: the alert
# names the cronguard job, and the scrape job stays in `job`.
overdue_labels() {
  curl -sf "$prom/api/v1/alerts" | python3 -c '
import json, sys
for a in json.load(sys.stdin)["data"]["alerts"]:
    if a["labels"]["alertname"] == "CronguardJobLate":
        l = a["labels"]
        print(l.get("job_name"), l.get("job"), "exported_job" in l, a["annotations"]["summary"])
'
}
wait_for '[ -n "$(overdue_labels)" ]' 60
labels=$(overdue_labels)
echo "CronguardJobLate: $labels"
[ "$labels" = "tick cronguard False cronguard job tick is overdue on 127.0.0.1:$port" ] \
  || { echo "CronguardJobLate does not name the cronguard job: $labels" >&2; exit 1; }
curl -s "$base/livez" || true
echo

# Whether alert $1 is active (pending or firing) for instance $2.
alert_active() {
  curl -sf "$prom/api/v1/alerts" | python3 -c '
import json, sys
alerts = json.load(sys.stdin)["data"]["alerts"]
sys.exit(0 if any(a["labels"]["alertname"] == sys.argv[1] and a["labels"].get("instance") == sys.argv[2] for a in alerts) else 1)
' "$1" "$2"
}
for mode in hang results503 retry3600; do
  instance="127.0.0.1:${scenario_port[$mode]}"
  wait_for "alert_active CronguardBackendResultsUndelivered $instance" 90
  echo "$mode: CronguardBackendResultsUndelivered is active"
done
wait_for "alert_active CronguardBackendPullStale 127.0.0.1:${scenario_port[hang]}" 90
echo "hang: CronguardBackendPullStale is active"
for mode in results503 retry3600; do
  if alert_active CronguardBackendPullStale "127.0.0.1:${scenario_port[$mode]}"; then
    echo "$mode: pulls work, yet CronguardBackendPullStale is active" >&2; exit 1
  fi
done
echo "e2e: ok"
