"""Which support images are scored leave-one-out, for every method.

Each method scores its normal (support) images leave-one-out, each against what the others
give, and derives its decision levels from those scores (:func:`lakead.decision.derive_thresholds`).
Beyond :data:`MAX_LOO_IMAGES` images an evenly spaced subset is scored (:func:`spread_subset`),
so the fit's cost stays bounded; the same spacing picks images wherever a few stand for many
(the scope check's sample, export's calibration images).
"""

from __future__ import annotations

import numpy as np

#: Support images scored leave-one-out at fit (an evenly spaced subset beyond this many).
MAX_LOO_IMAGES = 128


def spread_subset(n: int, limit: int) -> list[int]:
    """``limit`` indices evenly spaced over ``range(n)`` (all when ``n <= limit``).

    >>> spread_subset(5, 3)
    [0, 2, 4]
    """
    if n <= limit:
        return list(range(n))
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, limit)})
