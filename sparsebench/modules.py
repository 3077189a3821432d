"""How the parent starts a module of an interpreter's own sparsebench (the worker, the
probe, the op builder, a cluster task).

`python -m module` puts the current directory first on `sys.path`, so run from a checkout
it imports the checkout's sparsebench, not the one installed in that interpreter: `ab`
started in a checkout then ran the checkout's code on both sides (an A/B against a
baseline venv compared the checkout with itself, and a slowdown planted only in side B's
venv went unseen). The command here drops the current directory from `sys.path` before
the module is imported, on any Python 3 (`-P` needs 3.11); PYTHONPATH still applies."""

from __future__ import annotations

BOOT = ("import runpy, sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; del sys.argv[0]; "
        "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)")


def module_command(python: str, module: str, *args: str) -> list[str]:
    """`python -m module args`, importing `module` from `python`'s own installation."""
    return [python, "-c", BOOT, module, *args]
