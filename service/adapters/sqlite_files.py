"""SQLite files that hold applicants' data, readable and writable by their owner only.

The embedded store, the embedded outbox and the gateway's spool hold inputs as sent (incomes,
ages, ...): like the development key file, they are mode 0600. SQLite creates a database's
`-wal`, `-shm` and `-journal` companions with the mode of the database file, so creating that
file 0600 before SQLite opens it covers them too.
"""

import logging
import os
import stat
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

PRIVATE_MODE: Final = 0o600
COMPANIONS: Final = ("-wal", "-shm", "-journal")


def private_database(path: Path) -> None:
    """Create `path` (and its folder) if missing, mode 0600; narrow an existing file and its
    companions to 0600 if an earlier version left them readable by others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_CREAT without O_TRUNC: an existing database is opened as it is; umask can only narrow.
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_MODE))
    for file in (path, *(path.with_name(path.name + suffix) for suffix in COMPANIONS)):
        _narrow(file)


def _narrow(file: Path) -> None:
    try:
        mode = stat.S_IMODE(file.stat().st_mode)
        if mode & 0o077:
            file.chmod(mode & ~0o077)
    except FileNotFoundError:
        pass
    except PermissionError:
        # Someone else's file (another user runs the service): ours to warn about, not fix.
        log.warning("%s is readable by other users and cannot be narrowed to 0600 by us", file)
