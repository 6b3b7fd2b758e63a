"""What the command lines (train.py, `python -m jaxrl_llm.eval`, `python -m jaxrl_llm.plot`) share:
quiet imports, and one clean `error:` line for every problem the user can fix."""

from __future__ import annotations

import os
import sys
from typing import Callable

# transformers warns on import that PyTorch is missing; jaxrl_llm never needs it.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def run(main: Callable[[], object]) -> int:
    """`main()`'s exit code (0 unless it returns an int); a `JaxrlError` prints `error: <message>` and
    gives 2, Ctrl-C 130 and SIGTERM 143 (128 + the signal, as a shell reports them)."""
    from jaxrl_llm.errors import JaxrlError, Terminated

    try:
        code = main()
        return code if isinstance(code, int) else 0
    except JaxrlError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Terminated:
        return 143
    except KeyboardInterrupt:
        return 130
