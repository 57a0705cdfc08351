"""Quantizers and bit packing."""

from kvstream.quant.base import QuantizedTensor, Quantizer, passthrough, tensor_bytes
from kvstream.quant.packing import pack, packed_nbytes, unpack
from kvstream.quant.uniform import UniformQuantizer, masked_range

__all__ = [
    "QuantizedTensor",
    "Quantizer",
    "UniformQuantizer",
    "masked_range",
    "pack",
    "packed_nbytes",
    "passthrough",
    "tensor_bytes",
    "unpack",
]
