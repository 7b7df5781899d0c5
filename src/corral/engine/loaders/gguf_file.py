"""One GGUF file, opened with llama.cpp's own reader (`gguf`): its metadata values and its
tensors, memory-mapped, never read whole into memory.

Reading here never writes anything; every refusal (not a GGUF file, a split file, a
missing key) is a ModelLoadError naming the file and what is wrong with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, final

import numpy as np
import numpy.typing as npt
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor

from corral.engine.loaders.errors import model_load_error

__all__ = ["GGUFModel", "logical_shape", "tensor_rows", "tensor_type"]

_MISSING: Any = object()


@final
class GGUFModel:
    """An opened GGUF file.

    Args:
        path: the file.
        reference: what the user named it by (a path, `ollama:NAME`), for messages.

    Raises:
        EngineClientError: ModelLoadError when the file is not a readable GGUF file, or
            is one part of a split model.
    """

    def __init__(self, path: Path, reference: str) -> None:
        self.path = path
        self.reference = reference
        try:
            self._reader = _Reader(path)
        except (ValueError, KeyError, OSError) as error:
            raise model_load_error(reference, f"{reference} is not a readable GGUF file: "
                                              f"{error}") from None
        self.tensors: dict[str, ReaderTensor] = {t.name: t for t in self._reader.tensors}
        self.architecture: str = self.value("general.architecture")
        if int(self.value("split.count", 1)) > 1:
            raise model_load_error(reference, f"{reference} is one part of a split GGUF "
                                              f"model; merge the parts first "
                                              f"(llama-gguf-split --merge)")

    def value(self, key: str, default: Any = _MISSING) -> Any:
        """The metadata value under ``key`` (a number, a string, or a list of them).

        Raises:
            EngineClientError: ModelLoadError when the key is missing and no default
                is given.
        """
        field = self._reader.get_field(key)
        if field is None or not field.types:
            if default is _MISSING:
                raise model_load_error(self.reference, f"{self.reference} lacks the GGUF "
                                                       f"metadata key {key!r}", key=key)
            return default
        return field.contents()

    def arch_value(self, suffix: str, default: Any = _MISSING) -> Any:
        """``value(f"{architecture}.{suffix}")``, as llama.cpp names per-model keys."""
        return self.value(f"{self.architecture}.{suffix}", default)

    def has(self, key: str) -> bool:
        return self._reader.get_field(key) is not None


class _Reader(GGUFReader):
    """`GGUFReader` reading through a plain ndarray view of its memory map: numpy's
    memmap subclass makes each of the reader's many small slices (one per token of the
    vocabulary, twice) cost several microseconds, a third of a 49k-token vocabulary's
    13 s. The data stays memory-mapped; the signature is the base class's."""

    def _get(self, offset: int, dtype: npt.DTypeLike, count: int = 1,
             override_order: Literal["I", "S", "<"] | None = None) -> npt.NDArray[Any]:
        plain = self.__dict__.get("plain")
        if plain is None:
            plain = self.__dict__["plain"] = self.data.view(np.ndarray)
        count = int(count)
        size = int(np.dtype(dtype).itemsize) * count
        array: npt.NDArray[Any] = plain[offset:offset + size].view(dtype)[:count]
        return array.view(array.dtype.newbyteorder(
            self.byte_order if override_order is None else override_order))


def tensor_type(tensor: ReaderTensor) -> GGMLQuantizationType:
    """The tensor's GGML type (F32, Q4_0, Q6_K, ...)."""
    return GGMLQuantizationType(tensor.tensor_type)


def tensor_rows(tensor: ReaderTensor) -> npt.NDArray[Any]:
    """The tensor's data as rows: (rows, bytes or elements per row), memory-mapped.
    A 1-D tensor is one row."""
    data: npt.NDArray[Any] = tensor.data
    return data.reshape(1, -1) if data.ndim == 1 else data.reshape(-1, data.shape[-1])


def logical_shape(tensor: ReaderTensor) -> tuple[int, ...]:
    """The tensor's shape in numpy order (outermost first): GGUF lists it innermost
    first, so a (out, in) weight matrix is stored as ne = [in, out]."""
    return tuple(int(n) for n in reversed(np.asarray(tensor.shape).tolist()))
