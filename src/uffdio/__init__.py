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

from . import agent
from .manage import ManagedProcess, Manager, Spawned, manage

__version__ = "0.1.0"

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
