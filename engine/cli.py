"""The shared shell of the argparse entry points (evaluate, generate, merge): errors are one line."""

from __future__ import annotations

import os
import sys
from typing import Callable


def run_cli(body: Callable[[], int | None]) -> int:
    """Run `body`; return its exit code (None = 0), 130 on Ctrl-C, and 1 on any error, printed as
    one `error: Type: message` line on stderr without a traceback (ENGINE_TRACEBACK=1 shows it)."""
    try:
        return body() or 0
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - the one place CLI errors become a message
        if os.environ.get("ENGINE_TRACEBACK"):
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
