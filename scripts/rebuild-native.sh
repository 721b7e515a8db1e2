#!/usr/bin/env bash
# Rebuild the C extension of an editable install and swap it in atomically (rename), so that
# processes still running the old build (long test runs) keep their mapping intact.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$PWD/.venv/bin/python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp -r csrc "$tmp/"
(cd "$tmp" && "$PY" csrc/build_native.py >/dev/null 2>"$tmp/log" || { cat "$tmp/log"; exit 1; })
so=$(ls "$tmp"/uffdio/_native*.so)
# replace the build the editable install made (its name may carry the abi3 tag)
dest=$(ls src/uffdio/_native*.so 2>/dev/null | head -1)
[ -n "$dest" ] || dest=src/uffdio/$(basename "$so")
cp "$so" "$dest.new" && mv -f "$dest.new" "$dest"
echo "rebuilt $dest"
# the agent (LD_PRELOAD library): same flags as setup.py
gcc -shared -fPIC -O2 -Wall -Wextra -Wno-unused-parameter -std=gnu11 -fvisibility=hidden -Icsrc \
    ${UFFDIO_CFLAGS:-} -o "$tmp/_agent.so" csrc/agent.c -lpthread -ldl -Wl,-z,now
adest=$(ls src/uffdio/_agent*.so 2>/dev/null | head -1 || true)
[ -n "$adest" ] || adest=src/uffdio/_agent.abi3.so
cp "$tmp/_agent.so" "$adest.new" && mv -f "$adest.new" "$adest"
echo "rebuilt $adest"
