"""GGUF files converted into MLX directories, on tiny synthetic files written with
llama.cpp's own writer (`synthetic_gguf`): each architecture's names and config, each
quantization's exactness against `gguf`'s dequantizer and `mx.dequantize`, llama's Q/K
rows, tied output, the tokenizers, refusals before anything is written, and the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize, quantize
from mlx.utils import tree_flatten
from structlog.testing import capture_logs

from corral.engine.loaders import resolve_model, resolve_model_now
from corral.engine.loaders.gguf_arch import qk_row_order
from corral.engine.loaders.gguf_convert import MARKER, convert_gguf
from corral.engine.loaders.gguf_file import GGUFModel
from corral.engine.loaders.gguf_weights import convert_tensor, storage_for
from corral.protocol.errors import Code, EngineClientError
from synthetic_gguf import HEAD_DIM, KV_HEADS, hf_name, llama_permute, write_model


def _weights(model: Any) -> dict[str, np.ndarray]:
    """The model's parameters as float32, quantized layers dequantized by MLX."""
    params = dict(tree_flatten(model.parameters()))
    out = {}
    for name, value in params.items():
        stem, _, kind = name.rpartition(".")
        if kind in ("scales", "biases"):
            continue
        if kind == "weight" and f"{stem}.scales" in params:
            bits = value.shape[-1] // params[f"{stem}.scales"].shape[-1]
            value = mx.dequantize(value, params[f"{stem}.scales"].astype(mx.float32),
                                  params[f"{stem}.biases"].astype(mx.float32),
                                  group_size=32, bits=bits)
        out[name] = np.array(value.astype(mx.float32))
    return out


# -- quantization --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_q4_0_q4_1_q8_0_repack_exactly_into_mlx_affine(kind: Q) -> None:
    values = np.random.default_rng(1).normal(0, 0.02, size=(96, 256)).astype(np.float32)
    blocks = quantize(values, kind)
    reference = dequantize(blocks, kind)
    storage = storage_for(kind, 2)
    assert storage is not None and storage.exact
    arrays = {k: mx.array(v) for k, v in convert_tensor(blocks, kind, storage).items()}
    # In float32 the affine form d*q + bias is the block's value exactly.
    exact = mx.dequantize(arrays["weight"], arrays["scales"].astype(mx.float32),
                          arrays["biases"].astype(mx.float32), group_size=32,
                          bits=storage.bits)
    np.testing.assert_allclose(np.array(exact), reference, rtol=1e-6, atol=0)
    # As MLX computes it from the stored float16 scales: within float16 rounding.
    stored = mx.dequantize(arrays["weight"], arrays["scales"], arrays["biases"],
                           group_size=32, bits=storage.bits)
    np.testing.assert_allclose(np.array(stored.astype(mx.float32)), reference,
                               rtol=2e-3, atol=np.abs(reference).max() * 2e-3)


def test_k_quants_are_requantized_within_one_step_of_the_4_bit_grid() -> None:
    rng = np.random.default_rng(2)
    rows = 16
    header = np.concatenate([np.full((rows, 2, 2), 0.01, np.float16).view(np.uint8),
                             rng.integers(0, 256, (rows, 2, 12), dtype=np.uint8),
                             rng.integers(0, 256, (rows, 2, 128), dtype=np.uint8)], axis=-1)
    blocks = header.reshape(rows, -1)  # two Q4_K super-blocks a row: d, dmin, scales, qs
    reference = dequantize(blocks, Q.Q4_K)
    storage = storage_for(Q.Q4_K, 2)
    assert storage is not None and (storage.bits, storage.exact) == (4, False)
    arrays = {k: mx.array(v) for k, v in convert_tensor(blocks, Q.Q4_K, storage).items()}
    back = np.array(mx.dequantize(arrays["weight"], arrays["scales"].astype(mx.float32),
                                  arrays["biases"].astype(mx.float32), group_size=32, bits=4))
    groups = reference.reshape(rows, -1, 32)
    step = (groups.max(-1) - groups.min(-1)) / 15
    error = np.abs(back - reference).reshape(rows, -1, 32).max(-1)
    assert np.all(error <= step * 0.51 + 1e-3 * np.abs(groups).max(-1))


def test_llama_qk_rows_are_put_back_in_hugging_face_order() -> None:
    hf = np.arange(48 * 8, dtype=np.float32).reshape(48, 8)
    for heads in (1, 3, 6):
        stored = llama_permute(hf, heads)
        assert not np.array_equal(stored, hf)
        np.testing.assert_array_equal(stored[qk_row_order(48, heads)], hf)


def test_the_faster_reader_reads_what_ggufs_own_reader_reads(tmp_path: Path) -> None:
    """GGUFModel reads through a subclass of gguf's reader (for speed): same values."""
    path = tmp_path / "model.gguf"
    write_model(path, "qwen2", qtype=Q.Q4_1)
    ours, theirs = GGUFModel(path, "model.gguf"), GGUFReader(path)
    for key, field in theirs.fields.items():
        if field.types:
            assert ours.value(key) == field.contents(), key
    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    for tensor in theirs.tensors:
        np.testing.assert_array_equal(ours.tensors[tensor.name].data, tensor.data)


# -- architectures ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
@pytest.mark.parametrize("kind", [Q.F32, Q.Q8_0, Q.Q4_0])
def test_each_architecture_loads_with_the_weights_of_the_file(
        arch: str, kind: Q, tmp_path: Path) -> None:
    path = tmp_path / f"{arch}.gguf"
    expected = write_model(path, arch, qtype=kind, tied=arch != "qwen2")
    directory = convert_gguf(path, cache=tmp_path / "cache")
    config = json.loads((directory / "config.json").read_text())
    model_type = {"gemma3": "gemma3_text"}.get(arch, arch)
    assert config["model_type"] == model_type
    assert (config["head_dim"], config["num_key_value_heads"]) == (HEAD_DIM[arch], KV_HEADS)
    assert config["tie_word_embeddings"] is (arch != "qwen2")
    if kind == Q.F32:
        assert "quantization" not in config
    else:
        assert config["quantization"]["bits"] == (8 if kind == Q.Q8_0 else 4)
    model, tokenizer = mlx_lm.load(str(directory))
    loaded = _weights(model)
    assert set(loaded) == {hf_name(arch, name) for name in expected}
    for name, values in expected.items():
        np.testing.assert_allclose(loaded[hf_name(arch, name)], values, rtol=1e-6, atol=1e-6,
                                   err_msg=name)
    logits = model(mx.array([tokenizer.encode("hello world")]))
    assert logits.shape[-1] == len(tokenizer.vocab) == config["vocab_size"]
    assert bool(mx.all(mx.isfinite(logits)))


@pytest.mark.parametrize("kind,dtype", [(Q.F16, mx.float16), (Q.BF16, mx.bfloat16)])
def test_f16_and_bf16_matrices_stay_as_they_are(kind: Q, dtype: mx.Dtype,
                                                tmp_path: Path) -> None:
    path = tmp_path / "half.gguf"
    expected = write_model(path, "llama", qtype=kind)
    directory = convert_gguf(path, cache=tmp_path / "cache")
    assert "quantization" not in json.loads((directory / "config.json").read_text())
    model, _ = mlx_lm.load(str(directory))
    params = dict(tree_flatten(model.parameters()))
    assert params["model.layers.0.mlp.up_proj.weight"].dtype == dtype
    assert params["model.norm.weight"].dtype == mx.float32
    loaded = _weights(model)
    for name, values in expected.items():
        np.testing.assert_array_equal(loaded[hf_name("llama", name)], values, err_msg=name)


def test_a_layer_that_differs_from_the_rest_gets_its_own_quantization_entry(
        tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    up = rng.normal(size=(128, 64)).astype(np.float32)
    down = quantize(rng.normal(size=(64, 128)).astype(np.float32), Q.Q8_0)
    path = tmp_path / "mixed.gguf"
    write_model(path, "llama", qtype=Q.Q4_0, raw={"blk.1.ffn_up.weight": (up, Q.F32),
                                                   "blk.1.ffn_down.weight": (down, Q.Q8_0)})
    directory = convert_gguf(path, cache=tmp_path / "cache")
    quantization = json.loads((directory / "config.json").read_text())["quantization"]
    assert (quantization["bits"], quantization["group_size"]) == (4, 32)
    assert quantization["model.layers.1.mlp.up_proj"] is False
    assert quantization["model.layers.1.mlp.down_proj"] == {"group_size": 32, "bits": 8}
    model, _ = mlx_lm.load(str(directory))
    loaded = _weights(model)
    np.testing.assert_array_equal(loaded["model.layers.1.mlp.up_proj.weight"], up)
    np.testing.assert_allclose(loaded["model.layers.1.mlp.down_proj.weight"],
                               dequantize(down, Q.Q8_0), rtol=1e-6)


def test_a_separate_output_matrix_is_the_lm_head(tmp_path: Path) -> None:
    path = tmp_path / "untied.gguf"
    expected = write_model(path, "llama", qtype=Q.Q8_0, tied=False)
    directory = convert_gguf(path, cache=tmp_path / "cache")
    assert json.loads((directory / "config.json").read_text())["tie_word_embeddings"] is False
    model, _ = mlx_lm.load(str(directory))
    np.testing.assert_allclose(_weights(model)["lm_head.weight"], expected["output.weight"],
                               rtol=1e-6)


# -- refusals ------------------------------------------------------------------------------


def _nothing_written(cache: Path) -> bool:
    entries = [p for p in (cache / "gguf").glob("*") if p.name != "index.json"]
    return entries == []


def test_an_unsupported_architecture_is_refused_by_name_before_anything_is_written(
        tmp_path: Path) -> None:
    path = tmp_path / "mamba.gguf"
    write_model(path, "llama", architecture="mamba")
    with pytest.raises(EngineClientError) as caught:
        convert_gguf(path, cache=tmp_path / "cache")
    assert caught.value.code is Code.MODEL_LOAD_ERROR and not caught.value.retryable
    assert "'mamba' is not supported" in caught.value.message
    assert _nothing_written(tmp_path / "cache")


def test_an_unsupported_tensor_type_is_refused_by_name_before_anything_is_written(
        tmp_path: Path) -> None:
    path = tmp_path / "ternary.gguf"
    ternary = np.zeros((64, 2 * 66), dtype=np.uint8)  # TQ2_0: 66 bytes per 256 values
    write_model(path, "llama", raw={"blk.0.ffn_up.weight": (ternary, Q.TQ2_0)})
    with pytest.raises(EngineClientError) as caught:
        convert_gguf(path, cache=tmp_path / "cache")
    assert caught.value.code is Code.MODEL_LOAD_ERROR
    assert "TQ2_0" in caught.value.message
    assert _nothing_written(tmp_path / "cache")


def test_a_missing_or_foreign_file_is_a_model_load_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(EngineClientError, match="no such GGUF file"):
        resolve_model(str(tmp_path / "absent.gguf"))
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\x00" * 12)
    with pytest.raises(EngineClientError) as caught:
        resolve_model(str(tmp_path / "bad.gguf"))
    assert caught.value.code is Code.MODEL_LOAD_ERROR


# -- the cache -----------------------------------------------------------------------------


def test_a_second_conversion_reuses_the_cache_without_rewriting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    write_model(path, "qwen3", qtype=Q.Q4_1)
    with capture_logs() as first_logs:
        first = Path(resolve_model(str(path)))
    assert [e["event"] for e in first_logs] == ["model.converting", "model.converted"]
    assert first.parent == tmp_path / "cache" / "gguf"
    written = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    index = json.loads((tmp_path / "cache" / "gguf" / "index.json").read_text())
    assert index[str(path.resolve())]["sha256"] == first.name
    with capture_logs() as second_logs:
        second = Path(resolve_model(str(path)))
    assert second == first and second_logs == []
    assert {p.name: p.stat().st_mtime_ns for p in second.iterdir()} == written
    assert (first / "README.md").read_text().count(first.name) == 1
    card = json.loads((first / MARKER).read_text())
    assert card["tensors"]["Q4_1 2-D"].startswith("MLX affine 4-bit, group 32, repacked")


@pytest.mark.parametrize("damage", ["truncate weights", "delete config", "bad marker"])
def test_a_damaged_cache_entry_is_rebuilt(damage: str, tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    write_model(path, "llama", qtype=Q.Q8_0)
    directory = convert_gguf(path, cache=tmp_path / "cache")
    weights = (directory / "model.safetensors").read_bytes()
    if damage == "truncate weights":
        (directory / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    elif damage == "delete config":
        (directory / "config.json").unlink()
    else:
        (directory / MARKER).write_text("{")
    with capture_logs() as logs:
        again = convert_gguf(path, cache=tmp_path / "cache")
    assert again == directory and logs[-1]["event"] == "model.converted"
    assert (again / "model.safetensors").read_bytes() == weights
    mlx_lm.load(str(again))
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir()
            if p.name.startswith(".")] == []


def test_concurrent_conversions_publish_one_complete_copy(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    write_model(path, "llama", qtype=Q.Q4_0)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(
        convert_gguf(path, cache=tmp_path / "cache"))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1 and len(results) == 3
    assert sorted(p.name for p in (tmp_path / "cache" / "gguf").iterdir()) == sorted(
        ["index.json", results[0].name])
    mlx_lm.load(str(results[0]))


def test_a_conversion_cut_short_leaves_nothing_under_the_final_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model.gguf"
    write_model(path, "llama")
    cache = tmp_path / "cache"

    def crash(*_: Any, **__: Any) -> None:
        raise KeyboardInterrupt  # as a kill mid-write would, minus the process

    monkeypatch.setattr("corral.engine.loaders.gguf_convert.SafetensorsWriter.write", crash)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(path, cache=cache)
    assert sorted(p.name for p in (cache / "gguf").iterdir()) == ["index.json"]
    # A staging directory left by a process that died is removed by the next build.
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    (cache / "gguf" / f".{digest}.999999999.0000.tmp").mkdir()
    monkeypatch.undo()
    directory = convert_gguf(path, cache=cache)
    assert sorted(p.name for p in (cache / "gguf").iterdir()) == sorted(
        ["index.json", directory.name])


def test_resolve_model_now_answers_without_converting(
        tmp_path: Path, model_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    write_model(path, "llama")
    assert resolve_model_now(str(path)) is None  # neither hashed nor converted yet
    assert not (tmp_path / "cache").exists()
    directory = resolve_model(str(path))
    assert resolve_model_now(str(path)) == directory
    assert resolve_model_now(model_path) == model_path
    with pytest.raises(EngineClientError, match="no such directory"):
        resolve_model_now(str(tmp_path / "nowhere"))


def test_a_changed_file_is_hashed_again(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    write_model(path, "llama", seed=1)
    first = convert_gguf(path, cache=tmp_path / "cache")
    write_model(path, "llama", seed=2)
    os.utime(path, ns=(1, 1))
    second = convert_gguf(path, cache=tmp_path / "cache")
    assert first != second and first.exists() and second.exists()


# -- tokenizers ----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_the_tokenizer_round_trips_and_keeps_special_tokens_whole(
        arch: str, tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    write_model(path, arch)
    _, tokenizer = mlx_lm.load(str(convert_gguf(path, cache=tmp_path / "cache")))
    text = "hello  world\n\nthe é 中文 🙂 end"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    markers = ["<start_of_turn>", "<end_of_turn>"] if arch == "gemma3" \
        else ["<|im_start|>", "<|im_end|>"]
    for marker in markers:
        assert len(tokenizer.encode(marker, add_special_tokens=False)) == 1
    with_bos = tokenizer.encode("hello")
    if arch == "gemma3":  # the file says add_bos_token true, bos id 2
        assert with_bos[0] == 2 and with_bos.count(2) == 1
    else:  # add_bos_token false
        assert with_bos == tokenizer.encode("hello", add_special_tokens=False)
