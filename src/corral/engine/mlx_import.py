"""Importing mlx_lm once per process, without its side effect on the open-file limit.

When imported, `mlx_lm.utils` sets the open-file limit to (2048, 4096). Where the hard
limit is under 4096 (a container, a systemd unit with `LimitNOFILE=1024`, `ulimit -n`)
that raises ValueError ("not allowed to raise maximum limit") and no model can load;
where the soft limit is above 2048 it lowers it, and a server that takes hundreds of
connections runs out of descriptors. `import_mlx_lm` makes that one call keep what the
process has: the soft limit only goes up, and never past the hard limit.

Two threads importing mlx_lm at once (the engine threads of two models, a benchmark's
reference thread) can find it half-initialized ("cannot import name ... (most likely
due to a circular import)"), so the first import is made whole, one thread at a time.
"""

from __future__ import annotations

import resource
import sys
import threading
from collections.abc import Callable

__all__ = ["import_mlx_lm"]

_FIRST_IMPORT = threading.Lock()


def import_mlx_lm() -> None:
    """Import `mlx_lm` and `mlx_lm.generate` if this process has not yet.

    Blocks while another thread imports them. Raises what the import raises (an
    ImportError where mlx_lm is not installed); the open-file limit is then as it was.
    """
    if "mlx_lm.generate" in sys.modules:
        return
    with _FIRST_IMPORT:
        set_limit = resource.setrlimit
        resource.setrlimit = _keeping_open_files(set_limit)
        try:
            import mlx_lm
            import mlx_lm.generate  # noqa: F401
        finally:
            resource.setrlimit = set_limit


def _keeping_open_files(set_limit: Callable[[int, tuple[int, int]], None]
                        ) -> Callable[[int, tuple[int, int]], None]:
    """`resource.setrlimit` that, for RLIMIT_NOFILE only, keeps the hard limit and
    raises the soft one to what was asked if the hard limit allows, never lowering it."""

    def set_keeping_open_files(which: int, limits: tuple[int, int], /) -> None:
        if which != resource.RLIMIT_NOFILE:
            set_limit(which, limits)
            return
        soft, hard = resource.getrlimit(which)
        wanted = _at_most(limits[0], hard)
        if soft != resource.RLIM_INFINITY and wanted > soft:
            set_limit(which, (wanted, hard))

    return set_keeping_open_files


def _at_most(value: int, hard: int) -> int:
    return value if hard == resource.RLIM_INFINITY else min(value, hard)
