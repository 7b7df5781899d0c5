"""The two models corral names itself: `tiny`, the random-weight test model built offline
(`corral.tiny`), and `smollm2`, the default real model once `corral fetch-default-model`
has put its GGUF in the cache. Either name is a model reference wherever a path is
(`--model tiny`, `generation.models[].path: smollm2`), unless a file or directory of
that name exists, which wins.

Nothing here fetches: an uncached `smollm2` is an error that says how to fetch it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from corral.engine.loaders.errors import model_load_error
from corral.engine.loaders.smollm2 import SMOLLM2_ALIAS, cached_smollm2

__all__ = ["TINY_ALIAS", "builtin_model"]

TINY_ALIAS: Final = "tiny"
"""The name of the built-in test model, and the alias it is served under."""


def builtin_model(reference: str, *, build: bool) -> Path | None:
    """The file or directory a built-in name stands for; None when ``reference`` is not
    one (or names an existing path), or, with ``build`` false, when the tiny model is
    not built yet.

    Building the tiny model imports MLX and takes seconds the first time: call it with
    ``build`` from a worker thread.

    Raises:
        EngineClientError: ModelLoadError for `smollm2` when it is not in the cache.
    """
    if Path(reference).exists() or reference not in (TINY_ALIAS, SMOLLM2_ALIAS):
        return None
    if reference == SMOLLM2_ALIAS:
        cached = cached_smollm2()
        if cached is None:
            raise model_load_error(reference, f"{SMOLLM2_ALIAS} (SmolLM2-135M-Instruct, the "
                                              f"default model) is not in corral's cache: "
                                              f"run `corral fetch-default-model` first")
        return cached
    if not build:
        return None
    from corral.tiny import default_model_path

    return default_model_path()
