"""`ab --count` from the parent's side: the valgrind command a counted worker runs under,
and whether this machine can count at all (the worker side does the counting:
`train/measure/counting.py`)."""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

CALLGRIND_HEADER = Path("/usr/include/valgrind/callgrind.h")
# A counted cell runs 30-60x slower than native while instrumented and several times slower
# while not (valgrind translates every instruction): its timeout is scaled by this.
VALGRIND_SLOWDOWN = 40


def unavailable() -> str | None:
    """Why counting cannot run here (None: it can)."""
    if shutil.which("valgrind") is None:
        return "valgrind is not installed (Debian/Ubuntu: apt-get install valgrind)"
    if not CALLGRIND_HEADER.exists():
        return f"{CALLGRIND_HEADER} is missing (it comes with the valgrind package)"
    if shutil.which("cc") is None:
        return "no C compiler (cc) to build the callgrind shim"
    return None


def valgrind_prefix(out_folder: Path) -> list[str]:
    """callgrind with nothing instrumented until the worker's shim says so, simulated caches
    (for estimated cycles), one dump file per client-request dump in `out_folder`; under
    `setarch -R` (no address-space randomization) where util-linux has it: simulated cache
    misses depend on addresses, and with randomized ones two A/A processes of a dense-Adam
    cell differed by 2.2% in estimated cycles (0.1% in instructions); without, by 0.1%."""
    no_aslr = ["setarch", platform.machine(), "-R"] if shutil.which("setarch") else []
    return [*no_aslr, "valgrind", "--tool=callgrind", "--instr-atstart=no", "--cache-sim=yes",
            f"--callgrind-out-file={out_folder}/callgrind.%p", "--"]
