"""Values of the exact tail's oldest tokens, packed per token as soon as attention has read them.

Values are quantized per token (one range per token and channel group), so a token's values can be
packed on arrival and a block later takes those codes as they are. The tail keeps them as one store in the
block layout (``[1, B, H, N, t, U]``; each pack joined to the tokens held), all with the outlier units of the
first pack, kept until every token has gone into a block, so that a block joins them with its other tokens
(`SplitStore.join_tokens`). Keys still wait exact until their block (or key token group) fills.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstream.cache.memory import MemoryLedger
from kvstream.cache.store import SplitStore
from kvstream.quant.base import Quantizer


def store_tokens(store: SplitStore) -> int:
    """Tokens a value store holds."""
    return (store.low if store.low is not None else store.high).shape[4]


def store_bits(store: SplitStore) -> int:
    """A value store's normal width (its low part's, else its high part's)."""
    return (store.low if store.low is not None else store.high).bits


def restore_values(store: SplitStore, quantizer: Quantizer) -> torch.Tensor:
    """A value store dequantized, ``[B, H, tokens, D]`` fp32 (in the basis it was stored in)."""
    x = store.restore(quantizer).float()  # [1, B, H, N, t, U]
    _, b, h, n, t, u = x.shape
    return x[0].permute(0, 1, 3, 2, 4).reshape(b, h, t, n * u)


@dataclass
class PackedTailValues:
    """The per-token packed values at the front of a layer's exact tail (see the module)."""

    store: SplitStore | None = None
    outliers: torch.Tensor | None = None
    """[B, H, N] bool: the outlier units the store holds (those of its first pack); None with no store."""

    @property
    def length(self) -> int:
        return 0 if self.store is None else store_tokens(self.store)

    def append(self, store: SplitStore, outliers: torch.Tensor) -> None:
        """Add ``store`` after the tokens held, joined with them (one store to restore at each step)."""
        if self.store is None:
            self.store, self.outliers = store, outliers
        else:
            self.store = SplitStore.join_tokens([self.store, store])

    def take(self, n: int) -> SplitStore:
        """Remove and return the store of the first ``n`` tokens (``n`` at most `length`)."""
        store, size = self.store, self.length
        if n >= size:
            self.clear()
            return store
        self.store = store.tokens(n, size)
        return store.tokens(0, n)

    def keep_first(self, n: int) -> None:
        """Drop every token from the ``n``-th on (a crop)."""
        if n == 0:
            self.clear()
        elif n < self.length:
            self.store = self.store.tokens(0, n)

    def select_rows(self, index: torch.Tensor) -> None:
        if self.store is not None:
            self.store = self.store.select_rows(index)
            self.outliers = self.outliers.index_select(0, index.to(self.outliers.device))

    def clear(self) -> None:
        self.store, self.outliers = None, None

    def nbytes(self) -> int:
        return 0 if self.store is None else self.store.nbytes()

    def ledger(self, ledger: MemoryLedger) -> None:
        if self.store is not None:
            for q in (self.store.high, self.store.low):
                if q is not None:
                    ledger.add_quantized(q)
            ledger.add("indices", self.store.position)
