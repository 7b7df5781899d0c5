"""Models that are already MLX directories: a local directory, or a Hugging Face model id
whose snapshot is in the local Hugging Face cache. Reads the disk only, never the network.
"""

from __future__ import annotations

import os

from corral.engine.loaders.errors import model_load_error

__all__ = ["resolve_local"]


def resolve_local(reference: str) -> str:
    """The local directory ``reference`` names: the directory itself, or the snapshot of
    a Hugging Face model id in the local cache.

    Raises:
        EngineClientError: ModelLoadError saying, in the user's words, why
            ``reference`` leads to no model.
    """
    local = os.path.expanduser(reference)
    if os.path.isdir(local):
        if not os.path.isfile(os.path.join(local, "config.json")):
            raise model_load_error(reference, f"{reference} has no config.json: it is not "
                                              f"a model directory")
        return local
    if os.path.exists(local):
        raise model_load_error(reference, f"{reference} is a file, not a model directory")
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(reference, "config.json")
    except HFValidationError:
        raise model_load_error(reference, f"no such directory {reference}, and "
                                          f"{reference!r} is not a Hugging Face model id "
                                          f"(org/name) either") from None
    if isinstance(cached, str):
        return os.path.dirname(cached)
    raise model_load_error(reference, f"no such directory {reference}, and no model "
                                      f"{reference!r} in the Hugging Face cache at "
                                      f"{constants.HF_HUB_CACHE} (corral does not download "
                                      f"models: `hf download {reference}` does)")
