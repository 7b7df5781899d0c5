"""GGUF tensors as MLX arrays: how each GGML type is stored, and the conversion itself.

Q4_0, Q4_1 and Q8_0 are affine quantizations with groups of 32, which is what MLX holds
(`mx.quantize(..., group_size=32)`): they are repacked block by block, exactly, with the
file's float16 scales. K-quants and i-quants are dequantized with `gguf`'s own
dequantizer and quantized again, to 4 bits if the source has 4 bits or fewer, else to 8
(more bits than the file had, never fewer); F16, BF16 and F32 matrices stay as they are.
Vectors (norms, biases) become float32. Everything here is numpy; nothing imports MLX.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
import numpy as np
import numpy.typing as npt
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

__all__ = ["GROUP_SIZE", "Storage", "convert_tensor", "output_specs", "storage_for"]

GROUP_SIZE = 32

# Repacked bit for bit.
_EXACT = {Q.Q4_0: 4, Q.Q4_1: 4, Q.Q8_0: 8}
# Dequantized by gguf and quantized again to this many bits.
_REQUANTIZED = {
    Q.Q2_K: 4, Q.Q3_K: 4, Q.Q4_K: 4, Q.IQ4_NL: 4, Q.IQ4_XS: 4, Q.IQ3_XXS: 4, Q.IQ3_S: 4,
    Q.IQ2_XXS: 4, Q.IQ2_XS: 4, Q.IQ2_S: 4, Q.IQ1_S: 4, Q.IQ1_M: 4,
    Q.Q5_0: 8, Q.Q5_1: 8, Q.Q5_K: 8, Q.Q6_K: 8,
}
_FLOATS = {Q.F32: "F32", Q.F16: "F16", Q.BF16: "BF16"}


class Storage(msgspec.Struct, frozen=True):
    """How one GGUF tensor is stored in the MLX model.

    `affine`: an MLX quantized weight (`weight` uint32, `scales` and `biases` float16,
    groups of 32) with `bits`; `float`: a plain array of `dtype` (safetensors names).
    `exact` says whether the values are the file's own (repacked, or kept) rather than
    quantized again.
    """

    kind: Literal["affine", "float"]
    dtype: str = "F32"
    bits: int = 0
    exact: bool = True


def storage_for(kind: Q, ndim: int) -> Storage | None:
    """How a tensor of GGML type ``kind`` with ``ndim`` dimensions is stored, or None
    when corral cannot read that type (the caller names it in its refusal)."""
    if kind not in _FLOATS and kind not in _EXACT and kind not in _REQUANTIZED:
        return None
    if ndim == 1:
        return Storage("float", "F32", exact=kind not in _REQUANTIZED)
    if kind in _EXACT:
        return Storage("affine", "U32", _EXACT[kind], exact=True)
    if kind in _REQUANTIZED:
        return Storage("affine", "U32", _REQUANTIZED[kind], exact=False)
    return Storage("float", _FLOATS[kind])


def output_specs(storage: Storage,
                 shape: tuple[int, ...]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The arrays a tensor of logical ``shape`` becomes: suffix -> (dtype, shape)."""
    if storage.kind == "float":
        return {"weight": (storage.dtype, shape)}
    rows, cols = shape
    return {"weight": ("U32", (rows, cols * storage.bits // 32)),
            "scales": ("F16", (rows, cols // GROUP_SIZE)),
            "biases": ("F16", (rows, cols // GROUP_SIZE))}


def convert_tensor(rows: npt.NDArray[Any], kind: Q, storage: Storage, *,
                   row_order: npt.NDArray[np.intp] | None = None,
                   shift: float = 0.0) -> dict[str, npt.NDArray[Any]]:
    """Convert one tensor's data to its MLX arrays.

    Args:
        rows: the tensor's data as (rows, bytes or elements per row), as stored.
        kind: its GGML type.
        storage: what `storage_for` chose for it.
        row_order: a permutation of its rows (of a vector's elements) to apply first
            (llama's Q/K heads).
        shift: added to every value of a vector (Gemma's norms are stored plus one).

    Returns:
        suffix ("weight", "scales", "biases") -> array, as `output_specs` says.
    """
    if row_order is not None:  # a vector (a bias) is one row: reorder its elements
        rows = rows[row_order] if rows.shape[0] == row_order.size else rows[:, row_order]
    if storage.kind == "float":
        if storage.dtype == "F32" and (kind != Q.F32 or shift):
            return {"weight": (_dequantize(rows, kind) + np.float32(shift)).reshape(-1)}
        return {"weight": np.ascontiguousarray(rows)}
    if storage.exact:
        return _repack(np.ascontiguousarray(rows), kind)
    return _quantize(_dequantize(rows, kind), storage.bits)


def _dequantize(rows: npt.NDArray[Any], kind: Q) -> npt.NDArray[np.float32]:
    if kind == Q.BF16:  # the upper half of a float32, as stored
        return (rows.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    values: npt.NDArray[np.float32] = dequantize(rows, kind).astype(np.float32, copy=False)
    return values


def _repack(rows: npt.NDArray[np.uint8], kind: Q) -> dict[str, npt.NDArray[Any]]:
    """Q4_0, Q4_1, Q8_0 blocks as MLX affine arrays, bit for bit.

    A Q4 block is a float16 scale `d` (Q4_1: then a float16 minimum `m`) and 16 bytes
    whose low nibbles hold elements 0-15 and high nibbles elements 16-31; MLX packs
    consecutive elements, 8 to a little-endian uint32, the first in the lowest bits.
    Q4_0 is `d * (q - 8)`, so bias `-8d`; Q4_1 is `d * q + m`; Q8_0 is `d * q` with a
    signed q, stored unsigned as `q + 128` with bias `-128d`. Scaling a float16 by a
    power of two is exact.
    """
    n_rows = rows.shape[0]
    block = {Q.Q4_0: 18, Q.Q4_1: 20, Q.Q8_0: 34}[kind]
    blocks = rows.reshape(n_rows, -1, block)
    scales = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]
    if kind == Q.Q8_0:
        values = blocks[..., 2:] ^ np.uint8(0x80)  # int8 q -> uint8 q + 128
        biases = (scales.astype(np.float32) * -128).astype(np.float16)
        packed = np.ascontiguousarray(values)
    else:
        if kind == Q.Q4_1:
            biases = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0]
            nibbles = blocks[..., 4:]
        else:
            biases = (scales.astype(np.float32) * -8).astype(np.float16)
            nibbles = blocks[..., 2:]
        values = np.concatenate([nibbles & np.uint8(0x0F), nibbles >> np.uint8(4)], axis=-1)
        packed = np.ascontiguousarray(values[..., 0::2] | (values[..., 1::2] << np.uint8(4)))
    return {"weight": packed.reshape(n_rows, -1).view("<u4"),
            "scales": np.ascontiguousarray(scales), "biases": np.ascontiguousarray(biases)}


def _quantize(values: npt.NDArray[np.float32], bits: int) -> dict[str, npt.NDArray[Any]]:
    """Affine quantization with groups of 32, as `mx.quantize` stores it: per group a
    float16 scale and bias (the group's minimum), values `round((w - bias) / scale)`."""
    n_rows = values.shape[0]
    groups = values.reshape(n_rows, -1, GROUP_SIZE)
    low = groups.min(axis=-1)
    high = groups.max(axis=-1)
    levels = (1 << bits) - 1
    scales = ((high - low) / levels).astype(np.float16)
    biases = low.astype(np.float16)
    step = scales.astype(np.float32)[..., None]
    safe = np.where(step > 0, step, np.float32(1.0))
    q = np.clip(np.rint((groups - biases.astype(np.float32)[..., None]) / safe), 0, levels)
    q = np.where(step > 0, q, 0).astype(np.uint8)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << np.uint8(4))
    return {"weight": np.ascontiguousarray(q).reshape(n_rows, -1).view("<u4"),
            "scales": scales, "biases": biases}
