"""A Python program for the manager tests: one command per stdin line, one reply per line.

It owns one private anonymous region (mmap through libc, as any C extension would) and does
to it what programs do: fill, hash, madvise, mremap, munmap, fork.  It knows nothing of
uffdio unless told to start the agent itself ("agent PATH").
"""

import ctypes
import hashlib
import os
import random
import sys

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

PROT_RW, MAP_PRIVATE_ANON, MREMAP_MAYMOVE, MADV_DONTNEED = 3, 0x22, 1, 4


class Region:
    def __init__(self, n: int) -> None:
        self.len = n
        self.addr = libc.mmap(None, n, PROT_RW, MAP_PRIVATE_ANON, -1, 0)
        assert self.addr not in (None, ctypes.c_void_p(-1).value)

    def bytes(self, off: int = 0, n: int | None = None) -> bytes:
        return ctypes.string_at(self.addr + off, self.len - off if n is None else n)


def main() -> None:
    r = Region(int(sys.argv[1]) if len(sys.argv) > 1 else 16 << 20)
    out = sys.stdout
    for line in sys.stdin:
        cmd, *a = line.split()
        if cmd == "fill":
            data = random.Random(int(a[0])).randbytes(r.len)
            ctypes.memmove(r.addr, data, r.len)
            reply = f"{r.addr} {hashlib.sha256(data).hexdigest()}"
        elif cmd == "digest":
            off, n = (int(a[0]), int(a[1])) if a else (0, r.len)
            reply = hashlib.sha256(r.bytes(off, n)).hexdigest()
        elif cmd == "zero":
            reply = str(libc.madvise(r.addr + int(a[0]), int(a[1]), MADV_DONTNEED))
        elif cmd == "iszero":
            reply = "1" if r.bytes(int(a[0]), int(a[1])).count(0) == int(a[1]) else "0"
        elif cmd == "write":  # one byte per page of [off, off+len): the page is dirty again
            off, n, v = int(a[0]), int(a[1]), int(a[2])
            for p in range(off, off + n, 4096):
                ctypes.memset(r.addr + p, v, 1)
            reply = "ok"
        elif cmd == "touch":  # read one byte of every STEP-th page: fragments residency
            off, n, step = int(a[0]), int(a[1]), int(a[2])
            reply = str(sum(ctypes.string_at(r.addr + p, 1)[0] for p in range(off, off + n, step)))
        elif cmd == "mremap":
            new = libc.mremap(r.addr, r.len, int(a[0]), MREMAP_MAYMOVE)
            r.addr, r.len = new, int(a[0])
            reply = str(new)
        elif cmd == "munmap":
            reply = str(libc.munmap(r.addr + int(a[0]), int(a[1])))
            r.len = int(a[0])
        elif cmd == "fork":
            rd, wr = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.write(wr, hashlib.sha256(r.bytes()).hexdigest().encode())
                # the child's own writes must not show in the parent
                ctypes.memset(r.addr, 0xAB, r.len)
                os._exit(0 if r.bytes().count(0xAB) == r.len else 1)
            os.close(wr)
            child = os.read(rd, 64).decode()
            os.close(rd)
            _, st = os.waitpid(pid, 0)
            reply = (
                f"{child} {os.waitstatus_to_exitcode(st)} {hashlib.sha256(r.bytes()).hexdigest()}"
            )
        elif cmd == "forkzap":  # fork; the parent discards the region at once
            # (madvise DONTNEED) while the child waits SECONDS, then hashes its copy
            rd, wr = os.pipe()
            pid = os.fork()
            if pid == 0:
                import time

                time.sleep(float(a[0]))
                os.write(wr, hashlib.sha256(r.bytes()).hexdigest().encode())
                os._exit(0)
            os.close(wr)
            zap = libc.madvise(r.addr, r.len, MADV_DONTNEED)
            child = os.read(rd, 64).decode()
            os.close(rd)
            os.waitpid(pid, 0)
            reply = f"{child} {zap} {'1' if r.bytes().count(0) == r.len else '0'}"
        elif cmd == "ownuffd":  # register [off, off+len) with a userfaultfd of our own
            libc.syscall.restype = ctypes.c_long
            fd = libc.syscall(323, os.O_CLOEXEC | os.O_NONBLOCK)
            api = (ctypes.c_uint64 * 3)(0xAA, 0, 0)
            libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
            rc1 = libc.ioctl(fd, 0xC018AA3F, api)  # UFFDIO_API
            reg = (ctypes.c_uint64 * 4)(r.addr + int(a[0]), int(a[1]), 1, 0)
            rc2 = libc.ioctl(fd, 0xC020AA00, reg)  # UFFDIO_REGISTER, MISSING
            reply = f"{fd} {rc1} {rc2} {ctypes.get_errno()}"
        elif cmd == "forkmany":  # N children at once; each checks the data, then waits
            want = hashlib.sha256(r.bytes()).hexdigest()
            pids = []
            for _ in range(int(a[0])):
                pid = os.fork()
                if pid == 0:
                    ok = hashlib.sha256(r.bytes()).hexdigest() == want
                    import time

                    time.sleep(1.0)  # alive while the manager matches its siblings
                    os._exit(0 if ok else 1)
                pids.append(pid)
            reply = " ".join(str(os.waitstatus_to_exitcode(os.waitpid(p, 0)[1])) for p in pids)
        elif cmd == "rawfork":  # N children by glibc's _Fork: the agent's fork() is not run,
            # so they never say hello (as children of raw clone() in Go or a JIT); each
            # waits SECONDS, checks the data, and exits
            n, wait = int(a[0]), float(a[1])
            want = hashlib.sha256(r.bytes()).hexdigest()
            libc._Fork.restype = ctypes.c_int
            pids = []
            for _ in range(n):
                pid = libc._Fork()
                if pid == 0:
                    import time

                    time.sleep(wait)
                    os._exit(0 if hashlib.sha256(r.bytes()).hexdigest() == want else 1)
                pids.append(pid)
            reply = " ".join(str(os.waitstatus_to_exitcode(os.waitpid(p, 0)[1])) for p in pids)
        elif cmd == "forkexit":  # a daemon's fork: the child checks the data against
            # WANT after a moment and writes ok or bad to PATH; the parent answers the
            # child's pid and exits at once.  With a third argument the child first forks
            # a grandchild, which does the same into PATH.g
            pid = os.fork()
            if pid == 0:
                import time

                path = a[1]
                if len(a) > 2 and os.fork() == 0:
                    path += ".g"
                time.sleep(0.2)
                ok = hashlib.sha256(r.bytes()).hexdigest() == a[0]
                with open(path, "w") as f:
                    f.write("ok" if ok else "bad")
                os._exit(0)
            out.write(f"{pid}\n")
            out.flush()
            os._exit(0)
        elif cmd == "rss":
            reply = next(x.split()[1] for x in open("/proc/self/status") if x.startswith("VmRSS"))
        elif cmd == "agent":
            import uffdio.agent

            uffdio.agent.start(a[0])
            reply = "ok"
        elif cmd == "agent-stop":
            import uffdio.agent

            uffdio.agent.stop()
            reply = "ok"
        elif cmd == "exit":
            out.write("bye\n")
            out.flush()
            return
        else:
            reply = f"unknown {cmd}"
        out.write(reply + "\n")
        out.flush()


if __name__ == "__main__":
    main()
