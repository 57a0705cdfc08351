"""``python -m kvstream.kernels.build``: compile the CPU kernel for this machine ahead of use (`make setup`).

Prints one line saying what it did and how long it took; exits 0 without a compiler too, since
the reference attention path then serves every read.
"""

from __future__ import annotations

import sys
import time

from kvstream.kernels import cpu


def main() -> int:
    ready = cpu.load_built(cpu.build_name())
    if ready is not None:
        print(f"kvstream: CPU kernel already built for this machine ({ready.__file__})")
        return 0
    print("kvstream: building the CPU attention kernel for this machine ...", flush=True)
    start = time.perf_counter()
    try:
        module = cpu.build()
    except Exception as error:  # no compiler or headers: say so in one line, the reference path runs
        reason = cpu.failure_reason(error)
        print(f"kvstream: CPU kernel not built ({reason}); the reference attention path will run", file=sys.stderr)
        return 0
    print(f"kvstream: CPU kernel ready in {time.perf_counter() - start:.1f} s ({module.__file__})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
