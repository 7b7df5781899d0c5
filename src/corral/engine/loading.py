"""Loading one model's weights and tokenizer for the engine thread that will serve it.

`load_weights` runs ``mlx_lm.load`` on an MLX stream made by the calling thread (MLX
streams are thread-local, and mlx_lm's module-level stream belongs to whichever thread
imported mlx_lm first), with the model's chat template replaced when its settings say
so. Engine thread only; it never touches trio.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, cast

from corral.engine.base import EngineSettings

__all__ = ["LoadedWeights", "load_weights"]


@dataclass(frozen=True)
class LoadedWeights:
    """What ``mlx_lm.load`` gave, on the stream the model must be served on.

    Attributes:
        model: the MLX model.
        tokenizer: mlx_lm's `TokenizerWrapper`.
        config: the model's config.json, as mlx_lm read it.
        stream: the calling thread's MLX stream.
        seconds: how long the load took.
    """

    model: Any
    tokenizer: Any
    config: dict[str, Any]
    stream: Any
    seconds: float


def load_weights(settings: EngineSettings) -> LoadedWeights:
    """Load the model `settings.path` names, with `settings.chat_template` (a Jinja
    template, or the path of a file holding one) instead of its own when given; the
    tool-call format mlx_lm infers follows the template used.

    Raises:
        OSError: the chat template file cannot be read.
        Exception: whatever ``mlx_lm.load`` raised.
    """
    import mlx.core as mx
    import mlx_lm

    stream = mx.new_stream(mx.default_device())
    began = time.monotonic()
    template = settings.chat_template
    if template is not None and os.path.isfile(template):
        with open(template, encoding="utf-8") as file:
            template = file.read()
    with mx.stream(stream):
        # mlx_lm's annotation leaves out the config that return_config=True adds.
        model, tokenizer, config = cast(tuple[Any, Any, dict[str, Any]], mlx_lm.load(
            settings.path, return_config=True,
            tokenizer_config={} if template is None else {"chat_template": template}))
    return LoadedWeights(model, tokenizer, config, stream, time.monotonic() - began)
