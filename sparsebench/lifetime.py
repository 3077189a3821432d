"""Process lifetimes and network isolation shared by the parent and the worker side.

`die_with_parent`: a child asks the kernel for SIGKILL when its parent dies, so a
`kill -9` of `sparsebench run` takes the cell's worker with it, and the worker's death
takes its cluster's tasks. `private_network_command`: the prefix that runs a command in
a new user and network namespace (`unshare --user --map-root-user --net`), where only
loopback exists: TensorFlow's gRPC servers listen on every interface and authenticate
nothing, so a local cluster is started only where no other machine can reach it.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess

PR_SET_PDEATHSIG = 1
UNSHARE = ["unshare", "--user", "--map-root-user", "--net", "--"]
EXPOSED_OPT_IN = "SPARSEBENCH_EXPOSED_CLUSTER"  # =1: run local clusters without a private network


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux; a no-op elsewhere)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request: do what it would have done
        os.kill(os.getpid(), signal.SIGKILL)


def private_network_problem() -> str | None:
    """Why a private network namespace cannot be made here, or None if it can."""
    if shutil.which("unshare") is None:
        return "the 'unshare' program (util-linux) is not installed"
    try:
        done = subprocess.run([*UNSHARE, "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare failed: {exc}"
    if done.returncode != 0:
        detail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return f"unshare --user --net failed ({detail}); unprivileged user namespaces may be disabled"
    return None


def exposed_opt_in(environ=os.environ) -> bool:
    return environ.get(EXPOSED_OPT_IN, "") == "1"
