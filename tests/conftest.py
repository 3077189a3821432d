"""Shared test set-up: quiet TensorFlow's C++ logging before anything imports it, and one
rule for tests that need the fused custom op."""

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def require_custom_op(variant: str = "fused_custom_op") -> None:
    """Build (or find) the custom op for a test of `variant`; skip with the reason where it
    cannot be built, unless SPARSEBENCH_REQUIRE_CUSTOM_OP=1 (CI) makes that a failure."""
    from sparsebench.plan.spec import CUSTOM_OP_VARIANTS

    if variant not in CUSTOM_OP_VARIANTS:
        return
    from sparsebench.train.custom_ops import build

    info = build.build()
    if not info.ok:
        if os.environ.get("SPARSEBENCH_REQUIRE_CUSTOM_OP") == "1":
            pytest.fail(f"the custom op must build here: {info.reason} (log: {info.log})")
        pytest.skip(f"custom op unavailable: {info.reason}")
