"""Tests for corral.tiny: the offline model loads in mlx_lm and behaves like a model."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import mlx_lm
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.llama import Model, ModelArgs
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from corral.tiny import default_model_path, make_tiny_model

MODEL_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "model.safetensors",
)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any attempt to open a connection, and tell the HF hub it is offline."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the tiny model must load without the network")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def loaded(tiny_model: Path, offline: None) -> tuple[Model, TokenizerWrapper]:
    return mlx_lm.load(str(tiny_model))


def greedy(model: Model, tokenizer: TokenizerWrapper, prompt: str, n: int) -> list[int]:
    sampler = make_sampler(temp=0.0)
    return [
        response.token
        for response in mlx_lm.stream_generate(
            model, tokenizer, prompt, max_tokens=n, sampler=sampler
        )
    ]


def test_writes_every_file_and_stays_small(tiny_model: Path) -> None:
    for name in MODEL_FILES:
        assert (tiny_model / name).is_file(), name
    total = sum(path.stat().st_size for path in tiny_model.iterdir())
    assert total < 10 * 1024 * 1024


def test_same_seed_gives_identical_bytes(tiny_model: Path, tmp_path: Path) -> None:
    again = make_tiny_model(tmp_path / "again", seed=0)
    for name in MODEL_FILES:
        assert (again / name).read_bytes() == (tiny_model / name).read_bytes(), name


def test_seed_changes_weights_only(tiny_model: Path, tmp_path: Path) -> None:
    other = make_tiny_model(tmp_path / "other", seed=1)
    weights = "model.safetensors"
    assert (other / weights).read_bytes() != (tiny_model / weights).read_bytes()
    tokenizer = "tokenizer.json"
    assert (other / tokenizer).read_bytes() == (tiny_model / tokenizer).read_bytes()


def test_parameters_match_mlx_lm_llama(
    tiny_model: Path, loaded: tuple[Model, TokenizerWrapper]
) -> None:
    model, _ = loaded
    reference = Model(ModelArgs.from_dict(mlx_lm.utils.load_config(tiny_model)))
    shapes = {name: value.shape for name, value in tree_flatten(model.parameters())}
    expected = {
        name: value.shape for name, value in tree_flatten(reference.parameters())
    }
    assert shapes == expected
    assert 100_000 < sum(value.size for _, value in tree_flatten(model.parameters()))


def test_loads_offline_with_eos(loaded: tuple[Model, TokenizerWrapper]) -> None:
    _, tokenizer = loaded
    assert isinstance(tokenizer, TokenizerWrapper)
    eos = tokenizer.convert_tokens_to_ids("<|eos|>")
    assert tokenizer.eos_token_id == eos
    assert eos in tokenizer.eos_token_ids
    assert 512 <= len(tokenizer.get_vocab()) <= 1024


def test_chat_template_renders_turns(loaded: tuple[Model, TokenizerWrapper]) -> None:
    _, tokenizer = loaded
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there!"},
    ]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert prompt == (
        "<|bos|><|system|>Be brief.<|eos|><|user|>Hello there!<|eos|><|assistant|>"
    )
    without = tokenizer.apply_chat_template(messages, tokenize=False)
    assert without == prompt.removesuffix("<|assistant|>")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert ids.count(tokenizer.bos_token_id) == 1


def test_ascii_round_trips(loaded: tuple[Model, TokenizerWrapper]) -> None:
    _, tokenizer = loaded
    text = "Zebras quietly jog 42 km at 7:15 -- why? {\"x\": [1, 2]}\n\tdone."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode(text)[0] == tokenizer.bos_token_id


def test_greedy_is_deterministic_and_varied(
    loaded: tuple[Model, TokenizerWrapper],
) -> None:
    model, tokenizer = loaded
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me about the river."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    first = greedy(model, tokenizer, prompt, 24)
    assert first == greedy(model, tokenizer, prompt, 24)
    assert len(first) == 24
    assert len(set(first)) >= 5
    assert not set(first) & tokenizer.eos_token_ids
    text = tokenizer.decode(first)
    assert text.isascii() and text.strip()


def test_default_model_path_builds_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_CACHE_DIR", str(tmp_path))
    path = default_model_path()
    assert path == tmp_path / "tiny-model-v2"
    weights = path / "model.safetensors"
    built = weights.stat().st_mtime_ns
    assert default_model_path() == path
    assert weights.stat().st_mtime_ns == built


def test_default_model_path_honours_xdg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CORRAL_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_model_path() == tmp_path / "corral" / "tiny-model-v2"


def test_fills_an_existing_directory(tiny_model: Path, tmp_path: Path) -> None:
    target = tmp_path / "existing"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    (target / "config.json").write_text("{half a model")
    make_tiny_model(target)
    assert (target / "notes.txt").read_text() == "keep me"
    for name in MODEL_FILES:
        assert (target / name).read_bytes() == (tiny_model / name).read_bytes(), name


def test_concurrent_builds_keep_one_copy(tiny_model: Path, tmp_path: Path) -> None:
    target = tmp_path / "raced"
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(make_tiny_model(target)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [target, target]
    assert [path.name for path in tmp_path.iterdir()] == ["raced"]
    for name in MODEL_FILES:
        assert (target / name).read_bytes() == (tiny_model / name).read_bytes(), name
