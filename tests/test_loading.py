"""Loading weights for the engine: on the CPU device a quantized model is served in
float32 (MLX's CPU quantized matmul is ten times slower than BLAS), unless turned off."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from corral.engine.base import EngineSettings
from corral.engine.loading import load_weights


def _in_thread(fn: Callable[[], Any]) -> Any:
    """Each load in a fresh thread: MLX streams are thread-local, as in the engine."""
    box: list[Any] = []
    thread = threading.Thread(target=lambda: box.append(fn()))
    thread.start()
    thread.join()
    return box[0]


@pytest.fixture(scope="module")
def quantized_path(model_path: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    from mlx_lm import convert

    target = tmp_path_factory.mktemp("quantized") / "q4"
    _in_thread(lambda: convert(model_path, mlx_path=str(target), quantize=True,
                               q_group_size=64, q_bits=4))
    return str(target)


def _logits(path: str, cpu_dequantize: str) -> tuple[bool, list[float], int]:
    import mlx.core as mx

    def run() -> tuple[bool, list[float], int]:
        loaded = load_weights(EngineSettings(path, cpu_dequantize=cpu_dequantize))  # type: ignore[arg-type]
        quantized = sum(1 for _, m in loaded.model.named_modules() if "scales" in m)
        logits = loaded.model(mx.array([[1, 2, 3, 4, 5]]))[0, -1]
        return loaded.dequantized, logits.astype(mx.float32).tolist(), quantized

    result: tuple[bool, list[float], int] = _in_thread(run)
    return result


def test_a_quantized_model_is_served_in_float32_on_the_cpu_with_the_same_logits(
        quantized_path: str) -> None:
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        pytest.skip("dequantizing is for the CPU device only")
    dequantized, logits, quantized_layers = _logits(quantized_path, "auto")
    kept, stored_logits, stored_layers = _logits(quantized_path, "off")
    assert dequantized and quantized_layers == 0
    assert not kept and stored_layers > 0
    assert max(abs(a - b) for a, b in zip(logits, stored_logits, strict=True)) < 1e-2


def test_an_unquantized_model_is_left_as_it_is(model_path: str) -> None:
    dequantized, _, _ = _logits(model_path, "auto")
    assert not dequantized
