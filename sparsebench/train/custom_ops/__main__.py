"""`python -m sparsebench.train.custom_ops build|status [--json]`: the parent's way to
build or inspect the op without importing TensorFlow itself."""

import argparse
import json
import sys

from .build import as_dict, build, status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsebench.train.custom_ops")
    parser.add_argument("action", choices=["build", "status"])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--force", action="store_true", help="build: compile again whatever is cached")
    args = parser.parse_args(argv)
    from ..tf_import import import_tensorflow

    import_tensorflow()
    info = build(force=args.force) if args.action == "build" else status()
    if args.json:
        print(json.dumps(as_dict(info)))
    else:
        print(info.library if info.ok else info.reason)
    return 0 if info.ok else 1


if __name__ == "__main__":
    sys.exit(main())
