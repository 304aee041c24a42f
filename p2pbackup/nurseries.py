"""Making nursery failures readable.

trio wraps whatever a nursery's children raise in an ``ExceptionGroup``.
When one child fails with an expected error (a peer refused, a path vanished)
the caller wants that error, not a group of one; :func:`unwrap_single`
re-raises a group's only exception as itself. Groups of several different
failures stay groups, so nothing is hidden.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


def leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from leaves(exc)
        else:
            yield exc


@contextlib.contextmanager
def unwrap_single() -> Iterator[None]:
    """Inside, a group holding exactly one exception is raised as that exception."""
    try:
        yield
    except BaseExceptionGroup as group:
        found = list(leaves(group))
        if len(found) == 1:
            raise found[0] from None
        raise
