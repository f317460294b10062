"""Progress bars for long CLI work, on a terminal only.

A bar redrawn a few times a second is for a person watching; in a log file (a Ray job's, a
service's, CI's) it is thousands of lines of noise (a demo's log held 3,900 updates in 377 KB).
So a bar asked for shows only when stderr is a terminal (tqdm's ``disable=None``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tqdm import tqdm


def bar(iterable: Iterable | None = None, *, shown: bool | str = True, **kw: Any) -> tqdm:
    """A tqdm bar (ETA included) when ``shown`` and stderr is a terminal; otherwise one that draws nothing."""
    return tqdm(iterable, disable=None if shown else True, leave=False, **kw)
