"""The ``uffdio`` command line (also ``python -m uffdio``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="uffdio",
        description="Manage the memory of running processes from user space with userfaultfd.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    from . import bench, doctor, run

    run.add_parser(sub)
    doctor.add_parser(sub)
    bench.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = os.environ.get("UFFDIO_LOG", "").upper()
    if level:  # UFFDIO_LOG=debug|info|warning: uffdio's log on stderr
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            print(
                f"uffdio: UFFDIO_LOG={os.environ['UFFDIO_LOG']!r} is not a log level:"
                " use debug, info, warning or error (or leave it unset)",
                file=sys.stderr,
            )
            return 2
        logging.basicConfig(level=level, format="%(asctime)s uffdio %(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except OSError as exc:  # uffdio's errors name the cause and the fix
        print(f"uffdio {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
