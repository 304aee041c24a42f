#!/usr/bin/env bash
# RSS of a fresh `serve` with and without the dashboard (after it reports started, and 5 s on).
set -euo pipefail
P=${P:-.venv/bin/p2pbackup}
H=$(mktemp -d)/home
$P --home $H init --recovery-key-file $H.key >/dev/null
for flags in "--no-ui" ""; do
  $P --home $H serve --listen 127.0.0.1:0 $flags > $H.out 2>&1 &
  pid=$!
  until grep -q "serving on" $H.out; do sleep 0.2; done
  sleep 5
  if [ -z "$flags" ]; then curl -s -o /dev/null "$(sed -n 2p $H/ui-address)/" || true; sleep 1; fi
  echo "serve ${flags:-(dashboard on)}: $(grep VmRSS /proc/$pid/status)"
  kill $pid; wait $pid || true
done
