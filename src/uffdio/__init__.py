"""uffdio: manage the memory of running processes from user space with userfaultfd.

An async (asyncio or trio, through anyio) API over a C core that reads fault messages
through io_uring and resolves the faults it has data for without entering Python.
"""

from ._constants import EVENTS, PAGE_SIZE, Event, FaultFlag, Feature, Ioctl, Mode
from ._errors import (
    RingError,
    UffdBusyError,
    UffdClosedError,
    UffdError,
    UffdMappingChanged,
    UffdPermissionError,
    UffdProcessGone,
    UffdRangeError,
    UffdUnsupportedError,
    UffdWouldBlock,
    UnhandledFault,
)
from ._process import (
    pagemap_scan,
    pidfd_getfd,
    pidfd_open,
    process_madvise,
    read_memory,
    write_memory,
)
from ._uffd import (
    ErrorEvent,
    Fault,
    FaultBatch,
    ForkEvent,
    RemapEvent,
    RemoveEvent,
    Resolver,
    UnmapEvent,
    Userfaultfd,
)

__version__ = "0.1.0"

_LAZY = {
    "Manager": "manage",
    "ManagedProcess": "manage",
    "Spawned": "manage",
    "manage": "manage",
    "agent": "agent",
    "attach": "attach",
}


def __getattr__(name: str) -> object:
    # process management (subprocess, mmap, sockets...) is imported on first use, so that
    # `import uffdio` stays light for code that serves its own uffds
    if name in _LAZY:
        import importlib

        mod = importlib.import_module(f".{_LAZY[name]}", __name__)
        return mod if name in ("agent", "attach") else getattr(mod, name)
    raise AttributeError(f"module 'uffdio' has no attribute {name!r}")


__all__ = [
    "EVENTS",
    "PAGE_SIZE",
    "Event",
    "FaultFlag",
    "Feature",
    "Ioctl",
    "Mode",
    "RingError",
    "UffdBusyError",
    "UffdClosedError",
    "UffdError",
    "UffdMappingChanged",
    "UffdPermissionError",
    "UffdProcessGone",
    "UffdRangeError",
    "UffdUnsupportedError",
    "UffdWouldBlock",
    "UnhandledFault",
    "pagemap_scan",
    "pidfd_getfd",
    "pidfd_open",
    "process_madvise",
    "read_memory",
    "write_memory",
    "ErrorEvent",
    "Fault",
    "FaultBatch",
    "ForkEvent",
    "RemapEvent",
    "RemoveEvent",
    "Resolver",
    "UnmapEvent",
    "Userfaultfd",
    "Manager",
    "ManagedProcess",
    "Spawned",
    "manage",
    "agent",
]
