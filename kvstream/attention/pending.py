"""The hand-over between a packed cache's ``update`` and kvstream's attention function.

``update`` returns only the exact tail and leaves its layer here; the next attention call on the
same thread takes it and reads that layer's packed history. Packing waits until the read is done
(`PackedLayer.complete_update`); a layer whose read never happened refuses its next update.
"""

from __future__ import annotations

import threading
from typing import Any

_state = threading.local()


def pending_read(layer: Any) -> None:
    """Hand ``layer`` (which has just appended new tokens) to the next attention call."""
    _state.layer = layer


def take_pending() -> Any:
    """The layer waiting for this attention call, if any (consumed)."""
    layer = getattr(_state, "layer", None)
    _state.layer = None
    return layer
