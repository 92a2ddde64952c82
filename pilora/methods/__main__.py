"""``python -m pilora.methods [METHOD]``: the method keys (default, allowed values, users, help)."""

import sys

from . import METHODS, describe_keys

if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else None
    if name is not None and name not in METHODS:
        sys.exit(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    print(describe_keys(name))
