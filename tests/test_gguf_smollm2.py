"""SmolLM2-135M-Instruct's real GGUF (Q4_1, tied embeddings, llama architecture, byte-level
BPE with the `smollm` pre-tokenizer) converted to MLX: it answers, it scores a paragraph as
the file's own weights do, and it tokenizes as the file says. Then once through the
runtime. Prompts stay short: CPU prefill of this model is slow.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
import trio
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from mlx_lm.utils import load_model

from corral.config import config_from_mapping
from corral.engine.loaders.gguf_convert import convert_gguf
from corral.engine.loaders.gguf_file import GGUFModel
from corral.runtime import open_runtime
from synthetic_gguf import hf_name, unpermute

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PARAGRAPH = (
    "The history of the city goes back more than two thousand years. It began as a small "
    "settlement on an island in the river, where fishermen and traders built their homes. "
    "Over the centuries it grew into a great capital, famous for its bridges, its "
    "churches, its markets and its schools. Today millions of people visit it every year "
    "to walk along the river, to see the old buildings and to eat in its many restaurants."
)


@pytest.fixture(scope="module")
def converted(smollm2_gguf: Path, smollm2_cache: Path) -> Path:
    return convert_gguf(smollm2_gguf, cache=smollm2_cache)


@pytest.fixture(scope="module")
def loaded(converted: Path) -> tuple[Any, Any]:
    return mlx_lm.load(str(converted))


def _token_nll(model: Any, tokens: list[int]) -> np.ndarray:
    """The negative log-likelihood of each token after the first, given those before."""
    logits = model(mx.array([tokens]))[0, :-1].astype(mx.float32)
    targets = mx.array(tokens[1:])
    nll = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(
        logits, targets[:, None], axis=-1)[:, 0]
    return np.array(nll)


def _from_dequantized(gguf: Path, converted: Path, directory: Path) -> tuple[Any, list[Any]]:
    """An fp32 mlx_lm model from the file's weights as `gguf` dequantizes them, with the
    Q/K rows undone as this test writes it (not as the loader does); and the Q/K weights
    as the file stores them, to load in their place."""
    config = json.loads((converted / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        config.pop(key)
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    model = GGUFModel(gguf, str(gguf))
    heads = {"attn_q.weight": config["num_attention_heads"],
             "attn_k.weight": config["num_key_value_heads"]}
    weights, as_stored = {}, []
    for name, tensor in model.tensors.items():
        kind = GGMLQuantizationType(tensor.tensor_type)
        values = dequantize(np.asarray(tensor.data), kind).astype(np.float32)
        values = values.reshape([int(n) for n in reversed(tensor.shape.tolist())])
        if count := heads.get(name.split(".", 2)[-1]):
            as_stored.append((hf_name("llama", name), mx.array(values)))
            values = unpermute(values, count)
        weights[hf_name("llama", name)] = mx.array(values)
    mx.save_safetensors(str(directory / "model.safetensors"), weights)
    reference, _ = load_model(directory)
    return reference, as_stored


def test_it_answers_a_question_through_its_chat_template(loaded: tuple[Any, Any]) -> None:
    model, tokenizer = loaded
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert prompt[:2] == [1, 9690]  # <|im_start|>system: the template's, not an added BOS
    answer = mlx_lm.generate(model, tokenizer, prompt, max_tokens=8)
    assert "Paris" in answer


def test_its_perplexity_is_the_dequantized_files_and_wrong_q_k_rows_ruin_it(
        smollm2_gguf: Path, converted: Path, loaded: tuple[Any, Any], tmp_path: Path) -> None:
    model, tokenizer = loaded
    tokens = tokenizer.encode(PARAGRAPH)
    assert 80 <= len(tokens) <= 120
    ours = math.exp(_token_nll(model, tokens).mean())
    reference_model, as_stored = _from_dequantized(smollm2_gguf, converted, tmp_path / "fp32")
    reference = math.exp(_token_nll(reference_model, tokens).mean())
    reference_model.load_weights(as_stored, strict=False)  # Q/K rows as the file has them
    wrong = math.exp(_token_nll(reference_model, tokens).mean())
    print(f"perplexity over {len(tokens)} tokens: converted {ours:.3f}, fp32 dequantized "
          f"{reference:.3f}, Q/K rows left as stored {wrong:.3f}")
    assert abs(ours - reference) / reference < 0.01
    assert reference < 30 and wrong > 2 * reference


TEXTS = ["Héllo wörld, café déjà vu.", "中文测试：你好，世界。", "emoji 🙂👍🏽 and 👨‍👩‍👧 family",
         "  runs   of    spaces  ", "lines\n\n\nand\ttabs\r\n end\n", "Hello world! 123"]


def test_its_tokenizer_is_the_files(smollm2_gguf: Path, loaded: tuple[Any, Any]) -> None:
    _, tokenizer = loaded
    for text in TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    # Ids as Hugging Face's SmolLM2 tokenizer gives them: digits one by one.
    assert tokenizer.encode("Hello world! 123") == [19556, 905, 17, 216, 33, 34, 35]
    gguf = GGUFModel(smollm2_gguf, "smollm2")
    tokens = gguf.value("tokenizer.ggml.tokens")
    markers = set(re.findall(r"<\|[a-z_]+\|>", gguf.value("tokenizer.chat_template")))
    assert markers == {"<|im_start|>", "<|im_end|>"}
    for marker in markers:
        assert tokenizer.encode(marker) == [tokens.index(marker)]
    bos, eos = gguf.value("tokenizer.ggml.bos_token_id"), gguf.value("tokenizer.ggml.eos_token_id")
    assert (tokenizer.bos_token, tokenizer.eos_token) == (tokens[bos], tokens[eos])
    assert gguf.value("tokenizer.ggml.add_bos_token") is False
    assert tokenizer.encode("Hi")[0] != bos  # no BOS added, as the file says
    assert eos in tokenizer.eos_token_ids


async def test_the_runtime_serves_the_gguf_file(
        smollm2_gguf: Path, smollm2_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_CACHE_DIR", str(smollm2_cache))
    config = config_from_mapping({"json_rpc": {"default_timeout_ms": 300000}})
    with trio.fail_after(600):
        async with open_runtime(config, models={"smol": str(smollm2_gguf)}) as rt:
            [model] = rt.list_models()
            assert model.info is not None
            assert Path(model.info.path).parent == smollm2_cache / "gguf"
            reply = await rt.complete("smol", messages=QUESTION, max_tokens=8,
                                      temperature=0.0)
    assert "Paris" in reply.text
