"""The agent library: where it is, and how a Python program starts it on itself.

Programs started by :func:`uffdio.Manager.spawn` or ``uffdio run`` get the agent through
LD_PRELOAD.  A Python program that wants to be managed without LD_PRELOAD calls
:func:`start` with the manager's socket path; it runs the same C agent (a thread that never
takes the GIL) and speaks the same protocol.  Loaded this way the agent does not interpose
``mmap``/``fork`` for the interpreter (those symbols were bound before it was loaded): new
mappings are found by the manager's periodic scans, and forks are followed by the kernel
(EVENT_FORK) when the process may use it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from ._errors import error_for

_HERE = Path(__file__).resolve().parent
_lib = None


def library_path() -> str:
    """Absolute path of libuffdio_agent (the ``_agent*.so`` built with the package)."""
    found = sorted(_HERE.glob("_agent*.so"))
    if not found:
        raise FileNotFoundError(
            errno.ENOENT,
            f"uffdio's agent library is missing from {_HERE}: reinstall the package "
            "('pip install .' or 'make setup'), which builds csrc/agent.c",
        )
    return str(found[0])


def start(socket_path: str | os.PathLike[str]) -> None:
    """Put this process under the manager listening on ``socket_path``."""
    global _lib
    from cffi import FFI  # type: ignore[import-untyped]

    ffi = FFI()
    ffi.cdef("int uffdio_agent_start(const char *); int uffdio_agent_stop(void);")
    if _lib is None:
        _lib = ffi.dlopen(library_path())
    rc = _lib.uffdio_agent_start(os.fsencode(socket_path))
    if rc < 0:
        raise error_for(-rc, "uffdio agent", f"connecting to the manager at {socket_path}")


def stop() -> None:
    """Give this process back (the manager brings evicted pages back first)."""
    if _lib is None:
        raise error_for(errno.ENOTCONN, "uffdio agent", "the agent was not started")
    rc = _lib.uffdio_agent_stop()
    if rc < 0:
        raise error_for(-rc, "uffdio agent", "stopping")
