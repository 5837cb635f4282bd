"""The errors a user can fix, as one line on stderr and an exit code (2: input, 3: numbers, 4: files)."""

from __future__ import annotations

import sys
from collections.abc import Callable


def guarded(run: Callable[[], int]) -> int:
    """Run `run()` and turn the errors a user can fix into one line on stderr and an exit code."""
    # Imported when called: the command line imports this module before torch may be loaded.
    from swav.checkpoint import CheckpointError, RunFolderBusy
    from swav.config import ConfigError

    try:
        return run()
    except ConfigError as e:
        print(f"swav: config error: {e}", file=sys.stderr)
        return 2
    except RunFolderBusy as e:
        print(f"swav: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"swav: {e}", file=sys.stderr)
        return 4
    except (FileNotFoundError, NotADirectoryError) as e:
        print(f"swav: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"swav: {e}", file=sys.stderr)
        return 3
