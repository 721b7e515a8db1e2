"""The agent's wire protocol (mirror of csrc/agent_proto.h; change both together)."""

from __future__ import annotations

import array
import errno
import os
import socket
import struct
from typing import NamedTuple

import anyio

VERSION = 2  # 2: MOVE takes a scratch range to empty after its reply (b, c)
MAXWORDS = 8192
ENV_SOCK = "UFFDIO_AGENT_SOCK"

HDR = struct.Struct("<IIQqqqQ")  # type, flags, seq, a, b, c, n

# agent -> manager
A_HELLO = 1
A_REPLY = 2
A_FORKED = 3
A_FENCE = 4
A_FENCE_END = 5
A_KEPT = 6
A_RELEASE = 7
A_YIELD = 8
A_THREAD = 9
# manager -> agent
M_WELCOME = 16
M_SCAN = 17
M_MOVE = 18
M_DONTNEED = 19
M_DETACH = 20
M_GIVE_UFFD = 21
M_PING = 22
M_FENCE_ACK = 23
M_KEEP_FD = 24

# HELLO flags
AF_FORKED = 1
AF_HAS_UFFD = 2
AF_EVENT_FORK = 4
AF_RECONNECT = 8
AF_USER_MODE = 16
AF_TABLE_LOST = 32


class Msg(NamedTuple):
    type: int
    flags: int
    seq: int
    a: int
    b: int
    c: int
    words: array.array[int]
    fd: int  # -1 when no fd came with it


def pack(
    type: int,
    flags: int = 0,
    seq: int = 0,
    a: int = 0,
    b: int = 0,
    c: int = 0,
    words: array.array[int] | list[int] | None = None,
) -> bytes:
    w = words if words is not None else []
    payload = w.tobytes() if isinstance(w, array.array) else array.array("Q", w).tobytes()
    return HDR.pack(type, flags, seq, a, b, c, len(payload) // 8) + payload


def send_now(sock: socket.socket, data: bytes, fd: int = -1) -> None:
    """One message (with fd, if any) without waiting: BlockingIOError when the socket is
    full."""
    anc = (
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
        if fd >= 0
        else []
    )
    sock.sendmsg([data], anc)


async def send(sock: socket.socket, data: bytes, fd: int = -1) -> None:
    while True:
        try:
            send_now(sock, data, fd)
            return
        except BlockingIOError:
            await anyio.wait_writable(sock)


async def recv(sock: socket.socket) -> Msg | None:
    """One message, or None at EOF."""
    size = HDR.size + MAXWORDS * 8
    while True:
        try:
            data, anc, _flags, _addr = sock.recvmsg(size, socket.CMSG_SPACE(4))
            break
        except BlockingIOError:
            await anyio.wait_readable(sock)
        except ConnectionResetError:
            return None
    if not data:
        return None
    fd = -1
    for level, kind, cdata in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS and len(cdata) >= 4:
            fd = array.array("i", cdata[:4])[0]
            os.set_inheritable(fd, False)
    if len(data) < HDR.size:
        if fd >= 0:
            os.close(fd)
        raise OSError(errno.EBADMSG, "uffdio agent: short message")
    t, fl, seq, a, b, c, n = HDR.unpack_from(data)
    words = array.array("Q")
    words.frombytes(data[HDR.size : HDR.size + 8 * n])
    return Msg(t, fl, seq, a, b, c, words, fd)
