"""cffi build script for uffdio's C core (API / out-of-line mode).

Lives outside the installed package: setup.py names it in ``cffi_modules``.
The cdef is csrc/uffdio.h itself with the preprocessor lines removed, so the
declarations exist once.

liburing is found with pkg-config.  Override with the environment variables
UFFDIO_LIBURING_CFLAGS and UFFDIO_LIBURING_LIBS (for a liburing built from
source, e.g. ``-I/opt/liburing/include`` and ``-L/opt/liburing/lib -luring``).
UFFDIO_CFLAGS adds compile and link flags (``make test-asan`` uses it for sanitizers).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
MISSING = (
    "uffdio build: liburing was not found. Install it with "
    "'apt-get install liburing-dev pkg-config' (Debian/Ubuntu) or "
    "'dnf install liburing-devel' (Fedora), or set UFFDIO_LIBURING_CFLAGS and "
    "UFFDIO_LIBURING_LIBS."
)


def _liburing_flags() -> tuple[list[str], list[str]]:
    cflags = os.environ.get("UFFDIO_LIBURING_CFLAGS")
    libs = os.environ.get("UFFDIO_LIBURING_LIBS")
    if cflags is not None or libs is not None:
        return shlex.split(cflags or ""), shlex.split(libs or "-luring")
    try:
        cf = subprocess.run(
            ["pkg-config", "--cflags", "liburing"], check=True, capture_output=True, text=True
        ).stdout
        lb = subprocess.run(
            ["pkg-config", "--libs", "liburing"], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        if Path("/usr/include/liburing.h").exists():
            return [], ["-luring"]
        sys.exit(MISSING)
    return shlex.split(cf), shlex.split(lb)


def _cdef() -> str:
    text = (HERE / "uffdio.h").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    return "\n".join(lines)


cflags, libs = _liburing_flags()
# extra flags for instrumented builds, e.g. UFFDIO_CFLAGS="-fsanitize=address,undefined -g"
extra = shlex.split(os.environ.get("UFFDIO_CFLAGS", ""))
ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "uffdio._native",
    '#include "uffdio.h"',
    sources=[f"csrc/{n}" for n in ("ops.c", "engine.c", "floor.c", "target.c", "inject.c", "swap.c")],
    include_dirs=["csrc"],
    extra_compile_args=["-O2", "-Wall", "-Wno-unused-parameter", "-std=gnu11", *cflags, *extra],
    extra_link_args=[*libs, "-llz4", "-lpthread", *extra],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
