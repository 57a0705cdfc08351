"""The results store: where eval, ablate, tune and the benchmarks put runs, and where the report reads them.

`layout` names the folders and files, `io` writes a folder in one rename and reads its files back
typed, `keys` names runs and baselines, `provenance` says where a result came from, and `store`
reads and writes whole runs and baselines.
"""

from kvstream.results.store import ResultsStore, StoredRun

__all__ = ["ResultsStore", "StoredRun"]
