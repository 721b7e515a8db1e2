"""A scriptable target process, for tests, the demo and the benchmarks.

``python -m uffdio._target`` runs a small command interpreter (one command per line on
stdin, one reply per line on stdout) whose commands call the C helpers of csrc/target.c:
map memory, create a uffd and send it to the manager over fd 3 (SCM_RIGHTS), write and
check content patterns, touch pages with per-touch latency, fork, run threads, mremap,
madvise, munmap, and map a shared memfd twice (MINOR faults).  :class:`Target` is the
manager side.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Any

import anyio

from ._lib import ffi, lib

SOCK_FD = 3


def _serve_commands() -> int:  # runs in the target process
    from ._uffd import Userfaultfd

    uffds: list[Userfaultfd] = []
    out = sys.stdout
    for line in sys.stdin:
        argv = line.split()
        if not argv:
            continue
        args: list[Any]
        cmd, args = (
            argv[0],
            [int(a, 0) if a.lstrip("-").isdigit() or a.startswith("0x") else a for a in argv[1:]],
        )
        try:
            reply: list[Any] = []
            if cmd == "map":
                addr = lib.uf_mmap_anon(args[0])
                if not addr:
                    raise OSError("mmap failed")
                reply = [addr]
            elif cmd == "shm":
                alias = ffi.new("uint64_t *")
                addr = lib.uf_mmap_shared_pair(args[0], alias)
                if not addr:
                    raise OSError("memfd/mmap failed")
                reply = [addr, alias[0]]
            elif cmd == "uffd":
                u = Userfaultfd.open(args[0], optional=args[1] if len(args) > 1 else 0)
                uffds.append(u)
                u.send(SOCK_FD, int(u.features).to_bytes(8, "little"))
                reply = [int(u.features)]
            elif cmd == "register":
                reply = [int(uffds[-1].register(args[0], args[1], args[2]))]
            elif cmd == "closeuffd":
                for u in uffds:
                    u.close()
                uffds.clear()
            elif cmd == "fill":
                lib.uf_fill(args[0], args[1], args[2])
            elif cmd == "check":
                reply = [lib.uf_check(args[0], args[1], args[2])]
            elif cmd == "touch":
                n = args[1]
                lat = ffi.new("uint64_t[]", n) if args[3] != "-" else ffi.NULL
                reply = [lib.uf_touch(args[0], n, 4096, args[2], lat)]
                if args[3] != "-":
                    with open(args[3], "wb") as f:
                        f.write(ffi.buffer(lat))
            elif cmd == "threads":
                reply = [lib.uf_threads_check(args[0], args[1], args[2], args[3])]
            elif cmd == "fork":
                delay = args[3] if len(args) > 3 else 0  # ms the child waits first
                reply = [lib.uf_fork_check(args[0], args[1], args[2], delay)]
            elif cmd == "mremap":
                reply = [lib.uf_mremap(args[0], args[1], args[2])]
            elif cmd == "madvise":
                reply = [lib.uf_madvise(args[0], args[1], args[2])]
            elif cmd == "munmap":
                reply = [lib.uf_munmap(args[0], args[1])]
            elif cmd == "cpu":
                reply = [lib.uf_set_cpu(args[0])]
            elif cmd == "pid":
                reply = [os.getpid()]
            elif cmd == "exit":
                out.write("ok\n")
                out.flush()
                return 0
            else:
                raise ValueError(f"unknown command {cmd!r}")
            out.write("ok " + " ".join(str(r) for r in reply) + "\n")
        except Exception as exc:  # report, keep serving
            out.write(f"err {type(exc).__name__}: {exc}".replace("\n", " ") + "\n")
        out.flush()
    return 0


class TargetError(RuntimeError):
    pass


class Target:
    """Manager side of a ``python -m uffdio._target`` process."""

    def __init__(
        self,
        cpu: int | None = None,
        env: dict[str, str] | None = None,
        preexec: Any = None,
        user: int | None = None,
    ) -> None:
        self._sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        os.dup2(child.fileno(), 100)  # becomes fd 3 in the child (see pass_fds below)
        cmd = [
            sys.executable,
            "-c",
            "import os; os.dup2(100, 3); os.close(100); "
            "from uffdio._target import _serve_commands; raise SystemExit(_serve_commands())",
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            pass_fds=(100,),
            env=env,
            user=user,
            preexec_fn=preexec,
        )
        os.close(100)
        child.close()
        self.pid = self.proc.pid
        if cpu is not None:
            self.cmd("cpu", cpu)

    def cmd(self, *args: Any) -> list[int]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(" ".join(str(a) for a in args) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise TargetError(f"target exited (status {self.proc.wait()}) during {args[0]}")
        if line.startswith("err"):
            raise TargetError(f"target: {args[0]}: {line[4:].strip()}")
        return [int(x) for x in line.split()[1:]]

    async def acmd(self, *args: Any) -> list[int]:
        """Run a command that may fault, off the event loop (the loop must keep serving)."""
        return await anyio.to_thread.run_sync(self.cmd, *args, abandon_on_cancel=True)

    def open_uffd(self, features: int = 0, optional: int = 0) -> Any:
        """Create a uffd in the target and receive it here."""
        from ._uffd import Userfaultfd

        self.cmd("uffd", features, optional)
        u, data = Userfaultfd.receive(self._sock)
        u.features = type(u.features)(int.from_bytes(data[:8], "little"))
        return u

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f:
                f.close()
        self._sock.close()

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
