"""``uffdio run``, ``uffdio serve`` and ``uffdio agent-path``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

import anyio
import anyio.abc

from ._errors import UffdProcessGone
from .agent import library_path
from .manage import Manager, Spawned

FORWARDED = (
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGCONT,
    signal.SIGWINCH,
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="run a command with its memory managed by uffdio",
        description=(
            "Run CMD with the uffdio agent (LD_PRELOAD): its anonymous memory and that of its "
            "children is registered with userfaultfd and served by this process. Signals are "
            "forwarded; the exit status is CMD's."
        ),
    )
    p.add_argument(
        "--socket",
        metavar="PATH",
        help="agent socket (default: a private temp path); a manager killed meanwhile is"
        " taken over by `uffdio serve --socket PATH`",
    )
    _swap_options(p)
    p.add_argument("--stats-json", metavar="PATH", help="write final statistics as JSON")
    p.add_argument(
        "--churn",
        metavar="SECONDS",
        type=float,
        default=0.0,
        help="testing aid: evict every resident managed page every SECONDS",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no summary on stderr")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    p.set_defaults(func=cmd_run)

    s = sub.add_parser(
        "serve",
        help="serve agents connecting to a socket (and take over from a killed manager)",
        description=(
            "Serve every process whose agent connects to PATH, until SIGTERM/SIGINT. A process "
            "whose manager died reconnects here and continues with its evicted pages intact "
            "(those of a memory swap store too; without --limit they are served with no limit)."
        ),
    )
    s.add_argument("--socket", metavar="PATH", required=True)
    _swap_options(s)
    s.add_argument("--churn", metavar="SECONDS", type=float, default=0.0)
    s.add_argument("--stats-json", metavar="PATH")
    s.add_argument(
        "--exit-when-idle",
        action="store_true",
        help="exit when the last process it manages has exited",
    )
    s.set_defaults(func=cmd_serve)
    _add_attach_parser(sub)


def _swap_options(p: Any) -> None:
    p.add_argument(
        "--limit",
        metavar="SIZE",
        help="keep CMD's resident managed memory (with its children) under SIZE (e.g. 32M, 1G);"
        " cold pages go to the store",
    )
    p.add_argument(
        "--store",
        metavar="SPEC",
        help="where evicted pages go: memory (LZ4 in this process, the default), memory:ACCEL,"
        " file:PATH or file:PATH,max=SIZE (a swap file, removed at exit)",
    )
    p.add_argument(
        "--policy",
        metavar="NAME",
        help="limit (default: evict the least recently faulted pages above --limit), pressure"
        " (senpai-like: shrink the limit while uffdio's own fault stall time stays low), none",
    )


def _add_attach_parser(sub: Any) -> None:
    t = sub.add_parser(
        "attach",
        help="take charge of a running process with ptrace (no agent needed)",
        description=(
            "Attach to PID with ptrace: a userfaultfd is created inside it and its anonymous "
            "memory is registered and served until it exits, DURATION passes, or SIGINT/SIGTERM;"
            " then every evicted page is brought back and the process is left as it was. "
            "Needs CAP_SYS_PTRACE."
        ),
    )
    t.add_argument("pid", type=int)
    t.add_argument(
        "--churn",
        metavar="SECONDS",
        type=float,
        default=0.0,
        help="testing aid: evict every resident managed page every SECONDS",
    )
    t.add_argument(
        "--duration",
        metavar="SECONDS",
        type=float,
        default=0.0,
        help="give the process back after SECONDS (default: when it exits)",
    )
    t.add_argument("--stats-json", metavar="PATH")
    t.set_defaults(func=cmd_attach)

    a = sub.add_parser("agent-path", help="print the path of the agent library (LD_PRELOAD)")
    a.set_defaults(func=lambda args: print(library_path()))


async def churn(m: Manager, every: float) -> None:
    while True:
        await anyio.sleep(every)
        for p in list(m.processes.values()):
            if not p.managed:
                continue
            try:
                await p.evict()
            except UffdProcessGone:
                continue  # exited meanwhile
            except Exception as exc:  # e.g. no UFFDIO_MOVE, or a bug: say so, keep serving -
                # a manager that dies here would leave its programs waiting on faults
                if not p.exited:
                    print(f"uffdio: pid {p.pid}: eviction failed: {exc!r}", file=sys.stderr)


def _foreground() -> bool:
    """Is this process in the terminal's foreground group?  Then the terminal's SIGINT and
    SIGQUIT already reached the command, which shares the group."""
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except OSError:
        return False


async def forward_signals(prog: Spawned) -> None:
    with anyio.open_signal_receiver(*FORWARDED) as sigs:
        async for sig in sigs:
            if sig in (signal.SIGINT, signal.SIGQUIT) and _foreground():
                continue
            prog.send_signal(sig)


def _summary(m: Manager, extra: dict[str, Any]) -> dict[str, Any]:
    st = m.statistics()
    out: dict[str, Any] = dict(extra)
    out.update(
        faults=st["faults"],
        faults_resolved=st["resolved"],
        events=st["events"],
        pages_registered=st["registered_pages_max"],
        pages_evicted=st["pages_evicted"],
        evictions=st["evictions"],
        pages_skipped=st["pages_skipped"],
        fork_fences=st["fences"],
        store_bytes=st["store_bytes"],
        recovered_pages=st["recovered_pages"],
        processes=st["processes"],
        unmanaged=st["unmanaged"],
        refused=st["refused"],
        per_process=st["per_process"],
    )
    return out


def _write_stats(path: str | None, data: dict[str, Any]) -> None:
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, path)


async def _run(args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise SystemExit("uffdio run: no command given (uffdio run [options] -- CMD [ARGS...])")
    t0 = time.monotonic()
    sw = _make_swap(args)
    try:
        async with Manager(args.socket, swap=sw) as m:
            prog = m.spawn(cmd)
            async with anyio.create_task_group() as tg:
                tg.start_soon(forward_signals, prog)
                if args.churn > 0:
                    tg.start_soon(churn, m, args.churn)
                if sw is not None and not args.quiet and sys.stderr.isatty():
                    tg.start_soon(_status_line, sw)
                code = await prog.wait()
                final = sw.last_resident if sw is not None else None
                tg.cancel_scope.cancel()
            if sw is not None and not args.quiet and sys.stderr.isatty():
                sys.stderr.write("\r\x1b[K")
            summary = _summary(
                m,
                {
                    "command": cmd,
                    "exit_code": code,
                    "wall_s": round(time.monotonic() - t0, 3),
                    # the kernel's own account: ru_maxrss of CMD (and descendants it waited
                    # for), all of its memory, managed or not
                    "peak_rss_bytes": int(prog.rusage.ru_maxrss) * 1024 if prog.rusage else None,
                    "peak_resident_bytes": int(prog.rusage.ru_maxrss) * 1024
                    if prog.rusage
                    else None,
                },
            )
            if sw is not None:
                total_faults = summary["faults"]
                summary.update(sw.statistics())
                summary["faults"]["total"] = total_faults  # every fault the engines served
                summary["final_resident_bytes"] = final
                summary["managed_memory_note"] = (
                    "resident_bytes, peak_resident_bytes and final_resident_bytes count the "
                    "managed (registered) memory of CMD and its children, from the kernel's "
                    "page map; peak_rss_bytes is the kernel's ru_maxrss of everything"
                )
    finally:
        if sw is not None:
            sw.close()
    return code, summary


def _make_swap(args: argparse.Namespace, command: str = "run") -> Any:
    if args.limit is None and args.store is None and args.policy is None:
        return None
    from .swap import Swap, parse_size

    try:
        limit = parse_size(args.limit) if args.limit is not None else None
        if limit is not None and limit < (1 << 20):
            raise ValueError(f"--limit {args.limit}: at least 1M")
        return Swap(store=args.store or "memory", limit=limit, policy=args.policy)
    except ValueError as exc:
        raise SystemExit(f"uffdio {command}: {exc}") from None


def _total(faults: Any) -> Any:
    return faults["total"] if isinstance(faults, dict) else faults


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):.1f}M"


async def _status_line(sw: Any) -> None:
    """One line on the terminal, rewritten twice a second."""
    last_t, last_f = time.monotonic(), 0
    while True:
        await anyio.sleep(0.5)
        try:
            st = sw.statistics()
        except Exception as exc:  # a status line is not worth ending the manager for
            sys.stderr.write(f"\r\x1b[Kuffdio: no status line: {exc!r}\n")
            return
        now = time.monotonic()
        f = st["pages_swapped_in"]
        rate = (f - last_f) / max(1e-3, now - last_t)
        last_t, last_f = now, f
        ratio = st["compression_ratio"]
        sys.stderr.write(
            f"\r\x1b[Kuffdio: resident {_mib(st['resident_bytes'])}"
            f" / limit {_mib(st['limit_bytes'])}, evicted {st['pages_in_store'] * 4096 >> 20}M,"
            f" {rate:.0f} swap-ins/s, store {_mib(st['store_bytes'])}"
            + (f" (x{ratio})" if ratio else "")
        )
        sys.stderr.flush()


def cmd_run(args: argparse.Namespace) -> int:
    code, summary = anyio.run(_run, args)
    _write_stats(args.stats_json, summary)
    if not args.quiet:
        print(
            f"uffdio: {summary['command'][0]} exited {code}; {summary['processes']} process(es), "
            f"{_total(summary['faults'])} faults served, {summary['pages_evicted']} pages evicted, "
            f"peak RSS {(summary['peak_resident_bytes'] or 0) >> 20} MiB",
            file=sys.stderr,
        )
        if "limit_bytes" in summary:
            lat = summary["fault_latency_us"]
            print(
                f"uffdio: limit {_mib(summary['limit_bytes'])}, managed resident peak "
                f"{_mib(summary['peak_resident_bytes'])}; {summary['pages_evicted']} pages "
                f"evicted, {summary['pages_swapped_in']} swapped in (p50 {lat['p50']} us, p99 "
                f"{lat['p99']} us); store {summary['store']} {_mib(summary['store_bytes_peak'])}"
                " at its peak",
                file=sys.stderr,
            )
            for e in summary["errors"]:
                print(f"uffdio: {e}", file=sys.stderr)
        for u in summary["unmanaged"]:
            print(f"uffdio: pid {u['pid']} was not managed: {u['reason']}", file=sys.stderr)
    if code < 0:  # killed by a signal: die the same way, so the shell sees it
        sys.stdout.flush()
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code
    return code


def _serve_in_background(tg: anyio.abc.TaskGroup, m: Manager, every: float) -> None:
    """`serve` and `attach`: churn if asked, and end the task group on SIGTERM/SIGINT."""
    if every > 0:
        tg.start_soon(churn, m, every)

    async def stop_on_signal() -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
            async for _ in sigs:
                tg.cancel_scope.cancel()

    tg.start_soon(stop_on_signal)


async def _serve(args: argparse.Namespace) -> dict[str, Any]:
    sw = _make_swap(args, "serve")
    try:
        async with Manager(args.socket, swap=sw) as m:
            async with anyio.create_task_group() as tg:
                _serve_in_background(tg, m, args.churn)
                if args.exit_when_idle:
                    while not m.history or m.processes:  # noqa: ASYNC110 - polls two conditions
                        await anyio.sleep(0.05)
                    tg.cancel_scope.cancel()
            summary = _summary(m, {})
            if m.swap is not None:  # (a Swap made to take over a killed manager's too)
                total_faults = summary["faults"]
                summary.update(m.swap.statistics())
                summary["faults"]["total"] = total_faults
                # fork children whose uffd and table a killed manager's agents kept
                summary["recovered"]["fork_children"] = m.orphans_taken_over
            return summary
    finally:
        if sw is not None:
            sw.close()


def cmd_serve(args: argparse.Namespace) -> int:
    summary = anyio.run(_serve, args)
    _write_stats(args.stats_json, summary)
    return 0


async def _attach(args: argparse.Namespace) -> dict[str, Any]:
    async with Manager() as m:
        proc = await m.attach(args.pid)
        async with anyio.create_task_group() as tg:
            _serve_in_background(tg, m, args.churn)
            deadline = time.monotonic() + args.duration if args.duration > 0 else None
            while proc.managed and (deadline is None or time.monotonic() < deadline):  # noqa: ASYNC110 - polls two conditions
                await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
        exited = proc.exited  # before release(), which retires it either way
        if proc.managed:
            await proc.release()
        return _summary(m, {"pid": args.pid, "exited": exited})


def cmd_attach(args: argparse.Namespace) -> int:
    summary = anyio.run(_attach, args)
    _write_stats(args.stats_json, summary)
    print(
        f"uffdio: pid {args.pid} {'exited' if summary['exited'] else 'given back'}; "
        f"{summary['faults']} faults served, {summary['pages_evicted']} pages evicted",
        file=sys.stderr,
    )
    return 0
