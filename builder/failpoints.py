"""Named points where a crash test can kill a build: BUILDER_FAILPOINT=<name> sends SIGKILL there.

Points: read (source indexed), quantize (half the tensors written), shard (a shard closed),
manifest (manifest written, not yet renamed into place), swap (old artifact moved aside, new not in).
"""

import os
import signal

ENVIRONMENT = "BUILDER_FAILPOINT"


def reached(name: str) -> None:
    """Die here, as `kill -9` would, when the environment asks for this point."""
    if os.environ.get(ENVIRONMENT) == name:
        os.kill(os.getpid(), signal.SIGKILL)
