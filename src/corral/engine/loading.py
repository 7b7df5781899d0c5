"""Loading one model's weights and tokenizer for the engine thread that will serve it.

`load_weights` runs ``mlx_lm.load`` on an MLX stream made by the calling thread (MLX
streams are thread-local, and mlx_lm's module-level stream belongs to whichever thread
imported mlx_lm first), with the model's chat template replaced when its settings say
so.

On a CPU device it then turns quantized weights into float32 (`cpu_dequantize:
auto`), when they take at most `_CPU_FLOAT32_SHARE` of physical memory that way: MLX's
CPU kernel for quantized matmul runs a prompt at a tenth of the speed of a BLAS sgemm
(SmolLM2-135M Q4 on 2 cores: 2.4 against 25 tokens/s prefill), and decoding is no
slower. GPUs keep the weights as stored. Engine thread only; it never touches trio.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Final, cast

import structlog

from corral.engine.base import EngineSettings
from corral.engine.mlx_import import import_mlx_lm
from corral.engine.model_files import check_adapter, check_model_files, check_text_file
from corral.protocol.errors import Code, EngineClientError

__all__ = ["LoadedWeights", "load_weights"]

_log = structlog.get_logger("corral.engine")

_CPU_FLOAT32_SHARE: Final = 4  # float32 weights may take 1/this of physical memory


@dataclass(frozen=True)
class LoadedWeights:
    """What ``mlx_lm.load`` gave, on the stream the model must be served on.

    Attributes:
        model: the MLX model.
        tokenizer: mlx_lm's `TokenizerWrapper`.
        config: the model's config.json, as mlx_lm read it.
        stream: the calling thread's MLX stream.
        seconds: how long the load took.
        dequantized: quantized weights were turned into float32 (CPU device).
        group: the gang this process is a rank of (an ``mx.distributed.Group``), its
            shard of the model loaded; None when it holds the whole model.
    """

    model: Any
    tokenizer: Any
    config: dict[str, Any]
    stream: Any
    seconds: float
    dequantized: bool
    group: Any = None


def load_weights(settings: EngineSettings) -> LoadedWeights:
    """Load the model `settings.path` names, with `settings.chat_template` (a Jinja
    template, or the path of a file holding one) instead of its own when given; the
    tool-call format mlx_lm infers follows the template used. `settings.adapter_path`,
    a LoRA adapter directory, is applied by mlx_lm's loader.

    The directory is checked first (`check_model_files`: regular files only, bounded
    text files, a config that fits the weights), so nothing ``mlx_lm.load`` opens can
    block the process or grow it without bound.

    Raises:
        EngineClientError: ModelLoadError (not retryable) naming the file or config
            value `check_model_files` refused, or an adapter directory without its
            `adapter_config.json`.
        OSError: the chat template file cannot be read.
        Exception: whatever ``mlx_lm.load`` raised.
    """
    import mlx.core as mx

    import_mlx_lm()
    import mlx_lm

    began = time.monotonic()
    check_model_files(settings.path)
    if settings.adapter_path is not None:
        check_adapter(settings.adapter_path)
    template = settings.chat_template
    stream = mx.new_stream(mx.default_device())
    if template is not None and check_text_file(template):
        with open(template, encoding="utf-8") as file:
            template = file.read()
    gang = settings.distributed
    group = None if gang is None else mx.distributed.init(backend=gang.backend, strict=True)
    with mx.stream(stream):
        # mlx_lm's annotation leaves out the config that return_config=True adds.
        model, tokenizer, config = cast(tuple[Any, Any, dict[str, Any]], mlx_lm.load(
            settings.path, return_config=True, adapter_path=settings.adapter_path,
            lazy=group is not None,
            tokenizer_config={} if template is None else {"chat_template": template}))
        dequantized = settings.cpu_dequantize == "auto" and _dequantize_on_cpu(model, config)
        if group is not None:
            _shard(model, config, group)
    return LoadedWeights(model, tokenizer, config, stream, time.monotonic() - began,
                         dequantized, group)


def _shard(model: Any, config: dict[str, Any], group: Any) -> None:
    """Keep this rank's shard of a lazily loaded model (mlx_lm's tensor-parallel
    `shard`), load it, and wait until every rank has loaded theirs.

    Raises:
        EngineClientError: ModelLoadError (not retryable) when mlx_lm cannot shard the
            architecture, or its heads do not divide among the ranks.
    """
    import mlx.core as mx

    ranks = group.size()
    if not hasattr(model, "shard"):
        raise EngineClientError(
            Code.MODEL_LOAD_ERROR, f"mlx_lm has no tensor-parallel sharding for the "
            f"{config.get('model_type')!r} architecture: serve it in one process",
            {"model_type": config.get("model_type")}, retryable=False)
    for key in ("num_attention_heads", "num_key_value_heads"):
        heads = config.get(key)
        if isinstance(heads, int) and heads % ranks:
            raise EngineClientError(
                Code.MODEL_LOAD_ERROR, f"{key} = {heads} does not divide among {ranks} "
                f"ranks: choose a rank count that divides it",
                {key: heads, "ranks": ranks}, retryable=False)
    model.shard(group)
    mx.eval(model.parameters())
    # Every rank has its shard before any serves (as mlx_lm's sharded_load does).
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))


def _dequantize_on_cpu(model: Any, config: dict[str, Any]) -> bool:
    """Make a quantized model's weights float32 in place, on a CPU device, when they fit
    in `_CPU_FLOAT32_SHARE` of physical memory; True if it did."""
    import mlx.core as mx
    from mlx_lm.utils import dequantize_model

    if mx.default_device() != mx.cpu or "quantization" not in config:
        return False
    # Quantized layers (linear, embedding, switch) are the ones with scales and bits.
    quantized = [m for _, m in model.named_modules() if "scales" in m and hasattr(m, "bits")]
    if not quantized:
        return False
    parameters = sum(m.weight.size * 32 // m.bits for m in quantized)
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return False
    if parameters * 4 > memory // _CPU_FLOAT32_SHARE:
        _log.info("engine.kept_quantized", reason="float32 weights would not fit",
                  float32_bytes=parameters * 4)
        return False
    dequantize_model(model)
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    _log.info("engine.dequantized", reason="quantized matmul is slow on the CPU device",
              float32_bytes=parameters * 4)
    return True
