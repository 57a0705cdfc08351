"""Values of the exact tail's oldest tokens, packed per token as soon as attention has read them.

Values are quantized per token (one range per token and channel group), so a token's values can be
packed on arrival and a block later takes those codes as they are. The tail keeps them in the block layout
(``[1, B, H, N, t, U]``; each pack joined to the tokens held), all with the outlier units of the first pack,
kept until every token has gone into a block, so that the runs of one block join into one store
(`SplitStore.join_tokens`). Keys still wait exact until their block (or key token group) fills.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvstream.cache.memory import MemoryLedger
from kvstream.cache.store import SplitStore


@dataclass
class PackedTailValues:
    """Runs of per-token packed values at the front of a layer's exact tail (see the module)."""

    runs: list[SplitStore] = field(default_factory=list)
    outliers: torch.Tensor | None = None
    """[B, H, N] bool: the outlier units every run holds (those of the first run); None with no runs."""

    @property
    def length(self) -> int:
        return sum(_tokens(run) for run in self.runs)

    @property
    def bits(self) -> int:
        """The normal width of the runs (their low part's, else their high part's)."""
        run = self.runs[0]
        return (run.low if run.low is not None else run.high).bits

    def append(self, run: SplitStore, outliers: torch.Tensor) -> None:
        """Add ``run`` after the tokens held, joined with them (one run to restore at each step)."""
        if not self.runs:
            self.outliers = outliers
            self.runs.append(run)
        else:
            self.runs[-1] = SplitStore.join_tokens([self.runs[-1], run])

    def take(self, n: int) -> list[SplitStore]:
        """Remove and return the runs of the first ``n`` tokens (a run cut at ``n``)."""
        taken: list[SplitStore] = []
        while n:
            run = self.runs[0]
            size = _tokens(run)
            if size <= n:
                taken.append(self.runs.pop(0))
                n -= size
            else:
                taken.append(run.tokens(0, n))
                self.runs[0] = run.tokens(n, size)
                n = 0
        if not self.runs:
            self.outliers = None
        return taken

    def keep_first(self, n: int) -> None:
        """Drop every token from the ``n``-th on (a crop)."""
        outliers = self.outliers
        kept = self.take(min(n, self.length))
        self.runs, self.outliers = kept, outliers if kept else None

    def restore(self, quantizer: object) -> torch.Tensor:
        """The runs dequantized, ``[B, H, tokens, D]`` fp32 (in the basis they were stored in)."""
        parts = []
        for run in self.runs:
            x = run.restore(quantizer).float()  # [1, B, H, N, t, U]
            _, b, h, n, t, u = x.shape
            parts.append(x[0].permute(0, 1, 3, 2, 4).reshape(b, h, t, n * u))
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]

    def select_rows(self, index: torch.Tensor) -> None:
        self.runs = [run.select_rows(index) for run in self.runs]
        if self.outliers is not None:
            self.outliers = self.outliers.index_select(0, index.to(self.outliers.device))

    def clear(self) -> None:
        self.runs, self.outliers = [], None

    def nbytes(self) -> int:
        return sum(run.nbytes() for run in self.runs)

    def ledger(self, ledger: MemoryLedger) -> None:
        for run in self.runs:
            for q in (run.high, run.low):
                if q is not None:
                    ledger.add_quantized(q)
            ledger.add("indices", run.position)


def _tokens(run: SplitStore) -> int:
    return (run.low if run.low is not None else run.high).shape[4]
