"""Writes the hostile-input corpus's files that are not plain text to edit by hand: the
results files (derived from tests/fixtures/talk.jsonl, each broken in one way) and the data
files with bytes an editor hides (a lone carriage return, a NUL byte, gzip). Run it after
a results-format change and commit what it writes; the tests never run it.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

HERE = Path(__file__).parent
TALK = HERE.parent / "fixtures" / "talk.jsonl"
PROFILE = HERE.parent / "fixtures" / "distributed-profile-ps1.jsonl"
NIGHTLY = HERE.parent / "fixtures" / "history" / "2026-11-01-smoke.jsonl"
GOOD = "1 3:1 17:0.5 99:2\n0 4:1 18:3\n"  # two well-formed libsvm lines


def results(name: str, header=lambda h: h, record=lambda r: r, extra: list[str] = ()) -> None:
    lines = TALK.read_text().splitlines()
    head = header(json.loads(lines[0]))
    body = [json.dumps(record(json.loads(line))) for line in lines[1:3]]
    (HERE / "results" / name).write_text("\n".join([json.dumps(head), *body, *extra]) + "\n")


def edited(name: str, source: Path, edit) -> None:
    """A committed results file with each record edited in place by `edit`."""
    lines = [json.loads(line) for line in source.read_text().splitlines()]
    for record in lines[1:]:
        edit(record)
    (HERE / "results" / name).write_text("".join(json.dumps(line) + "\n" for line in lines))


def main() -> None:
    results("ok.jsonl")
    results("failed.jsonl", record=lambda r: {**r, "status": "failed", "reason": "worker killed by SIGSEGV",
                                             "windows": None, "samples_per_sec": None})
    results("header-not-json.jsonl", extra=[])
    (HERE / "results" / "header-not-json.jsonl").write_text("{not json\n")
    results("header-run-null.jsonl", header=lambda h: {**h, "run": None})
    results("header-environment-list.jsonl", header=lambda h: {**h, "environment": ["a", "b"]})
    results("header-environment-null.jsonl", header=lambda h: {**h, "environment": None})
    results("header-version-99.jsonl", header=lambda h: {**h, "version": 99})
    results("record-windows-strings.jsonl", record=lambda r: {**r, "windows": ["x", "y"]})
    results("record-window-null.jsonl", record=lambda r: {**r, "windows": [None, *r["windows"][1:]]})
    edited("history-window-null.jsonl", NIGHTLY, lambda r: r.get("windows") and r.update(
        windows=[None, *r["windows"][1:]]))
    edited("history-windows-zero.jsonl", NIGHTLY, lambda r: r.get("windows") and r.update(
        windows=[0.0] * len(r["windows"])))
    results("record-axes-null.jsonl", record=lambda r: {**r, "axes": None})
    results("record-axes-list.jsonl", record=lambda r: {**r, "axes": [1, 2]})
    results("record-status-bogus.jsonl", record=lambda r: {**r, "status": "great"})
    results("record-samples-string.jsonl", record=lambda r: {**r, "samples_per_sec": "fast"})
    results("record-cell-id-number.jsonl", record=lambda r: {**r, "cell_id": 7})
    results("record-cluster-bytes-strings.jsonl", record=lambda r: {
        **r, "axes": {**r["axes"], "strategy": "parameter_server", "ps_tasks": 1, "worker_tasks": 2},
        "cluster": {"ps_bytes_per_step": {"ps:0": {"sent": "lots", "received": None}}}})
    results("record-corrupt-line.jsonl", extra=['{"cell_id": "x", "status": "ok"', '{"cell_id": "y", "status": "ok"}'])
    edited("profile-bytes-negative.jsonl", PROFILE, lambda r: r.get("cluster") and r["cluster"].update(
        ps_bytes_per_step={task: {"sent": -5, "received": -5} for task in r["cluster"]["ps_bytes_per_step"]}))
    edited("profile-no-ps-tasks.jsonl", PROFILE, lambda r: r.get("axes", {}).pop("ps_tasks", None))
    # Headers that --resume reads: a real run's header of the hostile suite, with wrong types.
    suite = (HERE / "suites" / "ok.toml").read_text()
    run = {"suite": "ok", "suite_arg": "suites/ok.toml", "suite_source": "suites/ok.toml", "suite_text": suite,
           "overrides": [], "isolation": "cell"}
    for name, change in (("resume-suite-text-int.jsonl", {"suite_text": 5}),
                         ("resume-overrides-string.jsonl", {"overrides": "windows=3"}),
                         ("resume-overrides-numbers.jsonl", {"overrides": [3]}),
                         ("resume-suite-text-broken.jsonl", {"suite_text": "batch_size = [64\n"})):
        results(name, header=lambda h, change=change: {**h, "run": {**run, **change}})
    data = HERE / "data"
    for name, text in (("inf.libsvm", GOOD + "1 5:1e999 6:1\n"),
                       ("float32-overflow.libsvm", GOOD + "1 5:3.5e38\n"),
                       ("long-literal.libsvm", GOOD + "1 5:" + "1" * 40 + "\n"),
                       ("key-beyond-int64.libsvm", GOOD + "1 " + "9" * 19 + ":1\n"),
                       ("lone-cr.libsvm", GOOD + "1 5:1\r6:2\n"),
                       ("nul.libsvm", GOOD + "1 5:1\x002\n"),
                       # whitespace Python's strip() knows and RE2's \s does not, a form feed, \r\r\n, a tiny label
                       ("odd-lines.libsvm", GOOD + "\v\n\u00a0\n\x1c\n\u0085\n\f\n1 3:1\r\r\n1e-46 3:1\n")):
        (data / name).write_bytes(text.encode())
    (data / "mixed").mkdir(exist_ok=True)
    (data / "mixed" / "a.libsvm").write_bytes((GOOD + "1 5:nan\n").encode())
    with gzip.open(data / "mixed" / "b.libsvm.gz", "wb") as fh:
        fh.write((GOOD + "1 5:1e999\n").encode())
    whole = gzip.compress((GOOD * 50).encode(), mtime=0)
    (data / "cut.libsvm.gz").write_bytes(whole[:len(whole) - 12])  # a copy that stopped before the trailer
    truncated_blocks(data / "truncated.blocks")


def truncated_blocks(path: Path) -> None:
    """Five blocks of two examples (needs TensorFlow for the TFRecord framing), cut in the
    middle of block 3."""
    import numpy as np

    from sparsebench.train.inputs.blocks import write_blocks
    from sparsebench.train.inputs.data import SparseBatch

    splits = np.arange(0, 31, 3, dtype=np.int64)  # ten examples of three features
    batch = SparseBatch(splits, np.tile(np.array([1, 5, 9], np.int64), 10), np.ones(30, np.float32),
                        np.tile(np.array([0, 1], np.float32), 5))
    write_blocks(batch, path, feature_bits=10, block_examples=2)
    raw = path.read_bytes()
    block = 8 + 8 * 2 + 8 * 6  # a block's bytes: head, lengths and labels, keys and values
    framed = block + 16  # TFRecord: length, its CRC, data, its CRC
    header = len(raw) - 5 * framed
    path.write_bytes(raw[:header + 2 * framed + framed // 2])
    path.with_name("cut-at-block.blocks").write_bytes(raw[:header + 3 * framed])  # 3 whole blocks of 5
    keys = np.tile(np.array([1, 5, 9], np.int64), 10)
    keys[4] = -7
    write_blocks(SparseBatch(splits, keys, batch.values, batch.labels), path.with_name("negative-key.blocks"),
                 feature_bits=10, block_examples=2)


if __name__ == "__main__":
    main()
