"""What the command lines (train.py, `python -m jaxrl_llm.eval`, `python -m jaxrl_llm.plot`) share:
quiet imports, and one clean `error:` line for every problem the user can fix."""

from __future__ import annotations

import os
import sys
from typing import Callable

# transformers warns on import that PyTorch is missing; jaxrl_llm never needs it.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def run(main: Callable[[], int | None]) -> int:
    """`main()`'s exit code; a `JaxrlError` prints `error: <message>` and gives 2, Ctrl-C gives 130."""
    from jaxrl_llm.errors import JaxrlError

    try:
        return main() or 0
    except JaxrlError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
