"""`sparsebench data write|inspect`, run here because TFRecord needs TensorFlow.

`write`: the synthetic generator's examples in a file format (to try a file source, and
for tests). `inspect`: what a data file looks like, in the generator's terms (active
features per example, key-frequency skew as a Zipf exponent, binary vs continuous
values), so a user can set the generator to mimic their data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from ...errors import ConfigError
from ...plan.spec import DATA_FORMATS, DataSpec
from .data import SparseBatch, SyntheticData
from .blocks import BLOCK_EXAMPLES, BlocksError, read_header, write_blocks
from .datafiles import WRITERS, DataFileError, TFRecordNames, convert_to_blocks, read, source_files

# Ranks used for the Zipf fit: keys seen in at most this share of examples (hotter keys
# saturate, since a key counts once per example) and at least this many times (rarer ones
# are noise).
ZIPF_MAX_SHARE, ZIPF_MIN_COUNT = 0.05, 5


def zipf_exponent(keys: np.ndarray, examples: int) -> float | None:
    """The slope of log(count) over log(rank) of the keys' frequencies, in the range of
    ranks where it is a power law; None with too few keys to fit."""
    counts = np.sort(np.bincount(keys))[::-1] if len(keys) else np.array([])
    counts = counts[counts > 0]
    ranks = np.arange(1, len(counts) + 1)
    chosen = (counts / max(examples, 1) <= ZIPF_MAX_SHARE) & (counts >= ZIPF_MIN_COUNT)
    if chosen.sum() < 10:
        return None
    return float(-np.polyfit(np.log(ranks[chosen]), np.log(counts[chosen]), 1)[0])


def describe(batch: SparseBatch) -> dict:
    active = np.diff(batch.row_splits)
    binary = batch.values == 1.0
    continuous = batch.values[~binary]
    return {
        "examples": batch.batch_size,
        "positive_labels": float(batch.labels.mean()) if batch.batch_size else None,
        "active_per_example": {"mean": float(active.mean()), "p50": float(np.percentile(active, 50)),
                               "p99": float(np.percentile(active, 99)), "max": int(active.max())} if len(active) else None,
        "distinct_keys": int(len(np.unique(batch.keys))),
        "zipf_exponent": zipf_exponent(batch.keys, batch.batch_size),
        "binary_value_share": float(binary.mean()) if batch.nnz else None,
        "continuous_range": [float(np.abs(continuous).min()), float(np.abs(continuous).max())] if len(continuous) else None,
    }


def _write(args) -> int:
    spec = DataSpec(feature_bits=args.feature_bits, mean_active=args.mean_active, zipf_exponent=args.zipf_exponent,
                    seed=args.seed)
    spec.validate()
    path = Path(args.path)
    if path.exists() and not args.force:
        raise ConfigError(f"{path}: exists (--force to replace it)")
    batch = SyntheticData(spec).sample(args.examples, stream=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    compress = args.gzip or path.suffix == ".gz"
    if args.format == "blocks":
        write_blocks(batch, path, compress, feature_bits=args.feature_bits)  # renames a complete file into place
    else:
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:  # a full disk or a kill leaves no half-written file at PATH
            WRITERS[args.format](batch, partial, compress=compress)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
    print(f"wrote {batch.batch_size} examples ({batch.nnz} features) to {path} as {args.format}"
          f"{' (gzip)' if args.gzip or path.suffix == '.gz' else ''}")
    return 0


def _inspect(args) -> int:
    DataSpec(feature_bits=args.feature_bits).validate()
    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit: must be >= 1")
    batch, report = read(args.path, args.format, args.feature_bits, limit=args.limit, names=_feature_names(args))
    facts = {"path": args.path, "format": args.format, **describe(batch), "malformed": report.bad,
             "first_malformed": report.first_bad}
    if args.format == "blocks":
        facts["blocks_header"] = [read_header(path).__dict__ for path in source_files(args.path)]
    if args.json:
        print(json.dumps(facts))
        return 0
    a = facts["active_per_example"] or {}
    print(f"{args.path} ({args.format}): {facts['examples']} examples, {report.bad} malformed")
    if a:
        print(f"  active features per example: mean {a['mean']:.1f}, p50 {a['p50']:.0f}, p99 {a['p99']:.0f}, max {a['max']}")
    print(f"  distinct keys: {facts['distinct_keys']}; key-frequency Zipf exponent: "
          f"{facts['zipf_exponent']:.2f}" if facts["zipf_exponent"] is not None else
          f"  distinct keys: {facts['distinct_keys']}; too few keys to fit a Zipf exponent")
    if facts["binary_value_share"] is not None:
        rng = facts["continuous_range"]
        print(f"  binary values: {facts['binary_value_share']:.0%}; continuous |values| "
              f"{rng[0]:.3g} .. {rng[1]:.3g}" if rng else f"  binary values: {facts['binary_value_share']:.0%}")
    for line in report.first_bad:
        print(f"  malformed: {line}")
    for header in facts.get("blocks_header", []):
        origin = header["source"]
        print(f"  blocks v{header['version']}: {header['blocks']} blocks of {header['block_examples']} examples, "
              f"feature_bits {header['feature_bits']}, keys {header['key_dtype']}; "
              + (f"converted from {origin['path']} ({origin['format']}, {origin['bytes']} bytes, sha256 "
                 f"{origin['sha256'][:16]}...), {header['malformed']} malformed lines left out"
                 if origin else "written by sparsebench data write"))
        for line in header["first_malformed"]:
            print(f"    left out: {line}")
    if a and facts["zipf_exponent"] is not None:
        print(f"  to mimic it: [data] mean_active = {a['mean']:.0f}, zipf_exponent = {facts['zipf_exponent']:.2f}")
    return 0


def _convert(args) -> int:
    DataSpec(feature_bits=args.feature_bits).validate()
    if args.block_examples < 1:
        raise ConfigError("--block-examples: must be >= 1")
    path = Path(args.dst)
    if path.exists() and not args.force:
        raise ConfigError(f"{path}: exists (--force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    files = source_files(args.src)  # a source that is not there: one error line, nothing else
    print(f"converting {args.src} ({len(files)} {args.format} file{'s' if len(files) > 1 else ''}) to {path} ...",
          file=sys.stderr, flush=True)
    header = convert_to_blocks(args.src, args.format, path, args.feature_bits, _feature_names(args),
                               block_examples=args.block_examples)
    print(f"wrote {header.examples} examples ({header.entries} features) in {header.blocks} blocks to {path}; "
          f"{header.malformed} malformed {'line' if header.malformed == 1 else 'lines'} left out"
          + (f" (first: {header.first_malformed[0]})" if header.first_malformed else ""))
    return 0


def _add_feature_names(parser) -> None:
    """The TFRecord feature names a command reads with (`--ids-feature` ...)."""
    defaults = TFRecordNames()
    parser.add_argument("--ids-feature", default=defaults.ids)
    parser.add_argument("--values-feature", default=defaults.values)
    parser.add_argument("--label-feature", default=defaults.label)


def _feature_names(args) -> TFRecordNames:
    return TFRecordNames(args.ids_feature, args.values_feature, args.label_feature)


def _import_tensorflow_quietly() -> None:
    """Import TensorFlow with stderr closed: its C++ start-up lines (absl's, oneDNN's) are not
    the tool's output, and an error must stay one line."""
    import os

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            from ..tf_import import import_tensorflow

            import_tensorflow()
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparsebench data")
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write")
    write.add_argument("path")
    write.add_argument("--format", choices=DATA_FORMATS, required=True)
    write.add_argument("--examples", type=int, required=True)
    write.add_argument("--feature-bits", type=int, default=DataSpec.feature_bits)
    write.add_argument("--mean-active", type=float, default=DataSpec.mean_active)
    write.add_argument("--zipf-exponent", type=float, default=DataSpec.zipf_exponent)
    write.add_argument("--seed", type=int, default=0)
    write.add_argument("--gzip", action="store_true")
    write.add_argument("--force", action="store_true")
    inspect = sub.add_parser("inspect")
    inspect.add_argument("path")
    inspect.add_argument("--format", choices=DATA_FORMATS, required=True)
    inspect.add_argument("--feature-bits", type=int, default=DataSpec.feature_bits)
    inspect.add_argument("--limit", type=int, default=None)
    _add_feature_names(inspect)
    inspect.add_argument("--json", action="store_true")
    conv = sub.add_parser("convert")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--format", choices=[f for f in DATA_FORMATS if f != "blocks"], required=True)
    conv.add_argument("--feature-bits", type=int, default=DataSpec.feature_bits)
    conv.add_argument("--block-examples", type=int, default=BLOCK_EXAMPLES)
    _add_feature_names(conv)
    conv.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "convert" or args.format in ("tfrecord", "blocks"):  # what needs TensorFlow
        _import_tensorflow_quietly()
    try:
        if args.command == "write":
            if args.examples < 1:
                raise ConfigError("--examples: must be >= 1")
            return _write(args)
        if args.command == "convert":
            return _convert(args)
        return _inspect(args)
    except (ConfigError, DataFileError, BlocksError, OSError) as exc:
        print(f"sparsebench: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if not _is_tensorflow_file_error(exc):
            raise
        path = args.dst if args.command == "convert" else args.path
        print(f"sparsebench: error: {path}: {_first_line(exc.message)}", file=sys.stderr)
        return 2


def _is_tensorflow_file_error(exc: Exception) -> bool:
    """TensorFlow's file errors (an unwritable folder, a full disk: tf.errors.OpError) are the
    user's to fix like an OSError; TensorFlow is only looked up if the command imported it."""
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(exc, tf.errors.OpError)


def _first_line(text: str) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else "failed"


if __name__ == "__main__":
    sys.exit(main())
