"""How long does parsing one valid 264 × 18 CoilMessage take? (issue 2: "a few hundred microseconds")

Both encodings of the matrix, timed with ``timeit`` (best of several repeats, per message), on a
coil from the simulator: ``thickness`` as nested lists and ``thickness_b64``.

    .venv/bin/python bench/parse_message.py
"""

from __future__ import annotations

import os
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import provenance, write_section
from ml.sim import LineConfig, LineSimulator
from workflows.messages import encode_coil_message, parse_coil_message


def main() -> None:
    coil = LineSimulator(LineConfig(seed=5)).take(1)[0]
    rows = []
    for binary, name in ((False, "`thickness` (nested lists)"), (True, "`thickness_b64`")):
        payload = encode_coil_message(coil.coil_id, coil.line, coil.produced_at, coil.thickness, binary=binary)
        number = 500
        best = min(timeit.repeat(lambda p=payload: parse_coil_message(p), number=number, repeat=7)) / number
        rows.append(f"| {name} | {len(payload):,} | {best * 1e6:.0f} µs |")
        print(f"{name}: {len(payload)} bytes, {best * 1e6:.0f} µs per message")
    load = os.getloadavg()[0]
    write_section(
        "parse",
        "\n\n".join(
            [
                "## Parsing a CoilMessage (issue 2)",
                "| encoding | bytes | parse + validate, best of 7 × 500 |\n| --- | --- | --- |\n" + "\n".join(rows),
                f"Target: a few hundred microseconds. Load average during the run: {load:.1f}.",
                provenance(),
            ]
        ),
    )


if __name__ == "__main__":
    main()
