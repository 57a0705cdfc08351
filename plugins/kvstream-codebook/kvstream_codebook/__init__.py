"""kvstream-codebook: a non-uniform (k-means lookup-table) KV quantizer for kvstream, after KVQuant."""

from kvstream_codebook.quantizer import (
    ENV_TABLES,
    CodebookQuantizer,
    KMeansResult,
    default_table,
    kmeans_1d,
    normalise,
    synthetic_sample,
    uniform_table,
)

__version__ = "0.1.0"

__all__ = [
    "ENV_TABLES",
    "CodebookQuantizer",
    "KMeansResult",
    "default_table",
    "kmeans_1d",
    "normalise",
    "synthetic_sample",
    "uniform_table",
]
