#!/usr/bin/env bash
# Set up everything uffdio needs on a Debian/Ubuntu machine: system packages (liburing-dev, liblz4-dev,
# pkg-config, a C compiler, python3-venv, sqlite3 for the program tests) when missing, then a
# virtual environment in .venv with uffdio installed (editable) and its test dependencies.
# Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

need=()
pkg-config --exists liburing 2>/dev/null || [ -f /usr/include/liburing.h ] || need+=(liburing-dev)
[ -f /usr/include/lz4.h ] || need+=(liblz4-dev)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v gcc >/dev/null || need+=(gcc)
command -v sqlite3 >/dev/null || need+=(sqlite3)
"$PY" -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
    echo "bootstrap: installing system packages: ${need[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    if ! command -v apt-get >/dev/null; then
        echo "bootstrap: please install ${need[*]} with your package manager (no apt-get here)" >&2
        exit 1
    fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
stamp="$VENV/.uffdio-stamp"
sources=$(find pyproject.toml setup.py csrc -type f -print0 | sort -z | xargs -0 cat | sha1sum | cut -d" " -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$sources" ] || ! "$VENV/bin/python" -c 'import uffdio._native, uffdio.agent; uffdio.agent.library_path()' 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e '.[test]'
    echo "$sources" > "$stamp"
fi
