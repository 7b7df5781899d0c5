"""LoRA adapters per model (issue 23 part 5): `generation.models[].adapter_path` (and
`load_model(adapter_path=...)`) loads the model through mlx_lm's loader with the
adapter applied, under both isolations; an adapter directory that is not there is a
ModelLoadError (400) naming it, and the runtime serves on."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from corral.config import config_from_mapping
from corral.protocol.errors import Code, EngineClientError
from corral.runtime import open_runtime
from corral.server.errors import status_of

PROMPT = "The quick brown fox"
RANK = 4


def make_adapter(model: str, target: Path, *, std: float) -> Path:
    """A LoRA adapter for the tiny model as mlx_lm's tuner writes one: its
    `adapter_config.json` and `adapters.safetensors` with `lora_a` and `lora_b` of
    every layer's query and value projections (`std` 0: an adapter that changes
    nothing, as a fresh one does)."""
    config = json.loads((Path(model) / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    head = hidden // config["num_attention_heads"]
    outputs = {"q_proj": config["num_attention_heads"] * head,
               "v_proj": config["num_key_value_heads"] * head}
    rng = np.random.default_rng(1)
    weights = {}
    for layer in range(layers):
        for name, out in outputs.items():
            at = f"model.layers.{layer}.self_attn.{name}"
            weights[f"{at}.lora_a"] = mx.array(
                rng.normal(0, hidden ** -0.5, (hidden, RANK)).astype(np.float32))
            weights[f"{at}.lora_b"] = mx.array(rng.normal(0, std, (RANK, out))
                                               .astype(np.float32))
    target.mkdir()
    mx.save_safetensors(str(target / "adapters.safetensors"), weights)
    (target / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": layers,
        "lora_parameters": {"rank": RANK, "scale": 20.0, "dropout": 0.0,
                            "keys": ["self_attn.q_proj", "self_attn.v_proj"]}}))
    return target


@pytest.mark.parametrize("isolation", ["thread", "process"])
async def test_an_adapter_changes_generation_and_a_zero_one_does_not(
        model_path: str, tmp_path: Path, isolation: str) -> None:
    changing = make_adapter(model_path, tmp_path / "changing", std=1.0)
    neutral = make_adapter(model_path, tmp_path / "neutral", std=0.0)
    config = config_from_mapping({"generation": {"isolation": isolation, "models": [
        {"alias": "base", "path": model_path},
        {"alias": "tuned", "path": model_path, "adapter_path": str(changing)}]}})
    async with open_runtime(config) as rt:
        await rt.load_model(model_path, alias="neutral", adapter_path=str(neutral))
        base = await rt.complete("base", PROMPT, max_tokens=12, ignore_eos=True)
        tuned = await rt.complete("tuned", PROMPT, max_tokens=12, ignore_eos=True)
        same = await rt.complete("neutral", PROMPT, max_tokens=12, ignore_eos=True)
        assert tuned.usage.completion_tokens == 12
        assert tuned.token_ids != base.token_ids
        assert same.token_ids == base.token_ids


async def test_a_missing_adapter_is_a_load_error_naming_it(model_path: str,
                                                           tmp_path: Path) -> None:
    async with open_runtime(config_from_mapping({}), models={"tiny": model_path}) as rt:
        for adapter, says in [(tmp_path / "nowhere", "is not a directory"),
                              (tmp_path, "has no adapter_config.json")]:
            with pytest.raises(EngineClientError) as caught:
                await rt.load_model(model_path, alias="tuned", adapter_path=str(adapter))
            error = caught.value
            assert error.code is Code.MODEL_LOAD_ERROR and not error.retryable
            assert str(adapter) in error.message and says in error.message
            assert status_of(error) == 400
        assert (await rt.complete("tiny", PROMPT, max_tokens=2)).usage.completion_tokens == 2
