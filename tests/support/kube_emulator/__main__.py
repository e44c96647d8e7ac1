"""``python -m tests.support.kube_emulator --port N --dir D``: run the emulator."""

from __future__ import annotations

import sys

from .server import main

if __name__ == "__main__":
    sys.exit(main())
