#!/usr/bin/env bash
# Kill the manager of a forking program at a random moment, again and again, and check
# that a successor takes every process over with every byte right: swaptest (two
# threads, random access, 30% writes, fork/mremap/munmap/madvise events) with a thread
# that forks a child and a grandchild every few milliseconds (SWAPTEST_FORKS; each
# checks an area its parent had evicted), under `uffdio serve --limit 8M --churn 0.02`
# through the agent; SIGKILL after 1.0-3.0 s, then a second `uffdio serve` on the same
# socket until the program ends.  Stops at the first failure or hang.
#   usage: scripts/stress-takeover.sh [RUNS]      (about 40 s a run here)
set -u
cd "$(dirname "$0")/.."
PY=.venv/bin/python
D=$(mktemp -d)
SW=$D/swaptest
gcc -O2 -o "$SW" tests/progs/swaptest.c -lpthread -lm || exit 2
AGENT=$($PY -c 'import uffdio.agent; print(uffdio.agent.library_path())')
for i in $(seq 1 "${1:-20}"); do
  S=$D/m$i.sock
  $PY -m uffdio serve --socket "$S" --limit 8M --churn 0.02 2> "$D/m1.err" & M1=$!
  for _ in $(seq 1 200); do [ -S "$S" ] && break; sleep 0.05; done
  SWAPTEST_FORKS=4 SWAPTEST_MIN_MS=6000 UFFDIO_AGENT_SOCK="$S" LD_PRELOAD="$AGENT" \
    UFFDIO_AGENT_WP=1 "$SW" 32 rand 30000 2 30 fmrd > "$D/t.out" 2> "$D/t.err" & T=$!
  sleep "$(awk -v r=$RANDOM 'BEGIN { printf "%.2f", 1.0 + 2.0 * r / 32767 }')"
  kill -9 $M1; wait $M1 2>/dev/null
  UFFDIO_LOG=info $PY -m uffdio serve --socket "$S" --limit 8M --churn 0.02 --exit-when-idle \
    --stats-json "$D/s.json" 2> "$D/m2.err" & M2=$!
  for _ in $(seq 1 120); do kill -0 $T 2>/dev/null || break; sleep 1; done
  if kill -0 $T 2>/dev/null; then
    echo "run $i: HANG (threads of swaptest:)"
    for pid in $(pgrep -f "$SW"); do
      for t in /proc/"$pid"/task/*; do echo "  $pid/$(basename "$t") $(cat "$t"/wchan)"; done
      command -v gdb > /dev/null && gdb -p "$pid" -batch -ex "thread apply all bt 12" 2>/dev/null \
        | grep -E "^#|^Thread" | head -40
    done
    grep -v " DEBUG " "$D/m2.err" | tail -25
    [ -x .venv/bin/py-spy ] && .venv/bin/py-spy dump --pid $M2 | grep -v "^ *$" | head -80
    pkill -9 -f "$SW"; kill -9 $M2; exit 1
  fi
  wait $T; rc=$?
  for _ in $(seq 1 100); do kill -0 $M2 2>/dev/null || break; sleep 0.1; done
  kill $M2 2>/dev/null; wait $M2 2>/dev/null
  kids=$($PY -c "import json; r = json.load(open('$D/s.json'))['recovered']; print(r['processes'], r.get('fork_children'))" 2>/dev/null)
  echo "run $i: rc=$rc recovered(processes, fork children)=$kids $(tr '\n' ' ' < "$D/t.out" | tail -c 60)"
  if [ $rc -ne 0 ]; then head -c 600 "$D/t.err"; tail -5 "$D/m2.err"; exit 1; fi
done
