"""PII redaction on adversarial text against ordinary text of the same size, same run, as JSON.

    python -m adaptloop.streams.bench.redaction --megabytes 1 --out bench-redaction.json

Each adversarial shape repeats what once made a detector rescan the rest of the text from every position
(quadratic time): long runs of e-mail local-part characters, repeated BEGIN lines of a private key, dotted
domains, secret assignments, digit and colon runs that look like phone numbers, IPv6 addresses and IBANs.
The baseline is ordinary agent traffic of the same size with some PII in it. Prints the seconds per shape and
its ratio to the baseline; the slowest shape is named.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

from adaptloop.processes import cpu_name
from adaptloop.streams.pii import Redactor

SHAPES = {
    "email local part": "a%", "key BEGIN lines": "-----BEGIN RSA PRIVATE KEY-----\n", "dotted domain": "x@a.",
    "secret assignments": "password=", "aws key ids": "AKIAIOSFODNN7EXAMPLE ", "digit runs": "1 ",
    "colon runs": "1:", "iban-like groups": "DE00 ",
}
ORDINARY = ("Hi, I ordered a desk lamp last week (order A12345) and it still has not shipped. You can reach me at "
            "alice@example.com or +1 415-555-2671. Thanks! ")


def seconds(redactor: Redactor, text: str) -> float:
    started = time.perf_counter()
    redactor.redact(text)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adaptloop.streams.bench.redaction", description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=Path("bench-redaction.json"))
    args = parser.parse_args(argv)
    size = int(args.megabytes * 1_000_000)
    redactor = Redactor()
    baseline = seconds(redactor, (ORDINARY * (size // len(ORDINARY) + 1))[:size])
    print(f"ordinary text, {size / 1e6:g} MB: {baseline:.3f}s")
    shapes = {}
    for name, unit in SHAPES.items():
        took = seconds(redactor, unit * (size // len(unit)) + "@")
        shapes[name] = {"seconds": round(took, 3), "ratio_to_ordinary": round(took / baseline, 2)}
        print(f"{name:20s} {took:.3f}s  {took / baseline:.2f}x ordinary")
    slowest = max(shapes, key=lambda n: shapes[n]["seconds"])
    result = {"command": "python -m adaptloop.streams.bench.redaction " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": cpu_name(), "date": dt.date.today().isoformat(), "bytes": size,
              "ordinary_seconds": round(baseline, 3), "shapes": shapes, "slowest": slowest}
    args.out.write_text(json.dumps(result, indent=2))
    print(f"slowest: {slowest} ({shapes[slowest]['seconds']:.3f}s); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
