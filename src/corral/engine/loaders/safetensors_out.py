"""A safetensors file written as a stream: the header first (every name, dtype and shape
is known before any data), then each tensor's bytes as it is produced, so a multi-GB
model never has to sit in memory whole. The format is the one `mx.load` and the
`safetensors` library read: an 8-byte little-endian header length, a JSON header padded
with spaces to 8 bytes, then the data.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, BinaryIO, final

import numpy as np
import numpy.typing as npt

__all__ = ["SafetensorsWriter"]

_ITEM_SIZE = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4, "U8": 1}


@final
class SafetensorsWriter:
    """Writes one safetensors file whose tensors are declared up front; a context
    manager that closes the file.

    Args:
        path: the file to create.
        specs: name -> (dtype, shape) for every tensor, in the order they will come.
        metadata: the header's `__metadata__` strings.

    Raises:
        ValueError: from `write`, for a tensor out of order or of the wrong size
            (a bug in the caller, never a property of the input file).
    """

    def __init__(self, path: Path, specs: dict[str, tuple[str, tuple[int, ...]]],
                 metadata: dict[str, str]) -> None:
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        self._sizes: list[tuple[str, int]] = []
        for name, (dtype, shape) in specs.items():
            size = _ITEM_SIZE[dtype]
            for n in shape:
                size *= n
            header[name] = {"dtype": dtype, "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            self._sizes.append((name, size))
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._file: BinaryIO = open(path, "wb")  # noqa: SIM115 (closed in __exit__)
        self._file.write(struct.pack("<Q", len(encoded)))
        self._file.write(encoded)
        self._next = 0

    def write(self, name: str, array: npt.NDArray[Any]) -> None:
        """Append the next tensor's bytes (C order)."""
        expected, size = self._sizes[self._next]
        if name != expected or array.nbytes != size:
            raise ValueError(f"safetensors: got {name} ({array.nbytes} bytes), "
                             f"expected {expected} ({size} bytes)")
        self._file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        self._next += 1

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        """Close the file.

        Raises:
            ValueError: on a normal exit, when not every declared tensor was written.
        """
        self._file.close()
        if kind is None and self._next != len(self._sizes):
            raise ValueError(f"safetensors: {len(self._sizes) - self._next} tensors "
                             f"declared but not written")
