"""`ollama:NAME[:TAG]` read from a fake Ollama store laid out as Ollama lays it out:
manifests by host/namespace/model/tag naming blobs by their SHA-256 digest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from corral.engine.loaders import resolve_model
from corral.engine.loaders.ollama import MODEL_MEDIA_TYPE, find_ollama_model
from corral.protocol.errors import Code, EngineClientError
from synthetic_gguf import write_model


def _pull(store: Path, gguf: Path, name: str, tag: str, namespace: str = "library") -> str:
    """Lay out a pulled model as Ollama does; the blob is a symlink to ``gguf``."""
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    blobs = store / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    blob = blobs / f"sha256-{digest}"
    if not blob.exists():
        blob.symlink_to(gguf)
    manifest = store / "manifests" / "registry.ollama.ai" / namespace / name / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    layers = [{"mediaType": MODEL_MEDIA_TYPE, "digest": f"sha256:{digest}",
               "size": gguf.stat().st_size},
              {"mediaType": "application/vnd.ollama.image.template",
               "digest": "sha256:" + "0" * 64, "size": 10}]
    manifest.write_text(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "digest": "sha256:" + "1" * 64, "size": 2},
        "layers": layers}))
    return digest


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    monkeypatch.setenv("CORRAL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "ollama"


def test_a_pulled_model_resolves_by_name_and_tag_without_copying_the_blob(
        store: Path, tmp_path: Path) -> None:
    small = tmp_path / "small.gguf"
    write_model(small, "qwen3")
    other = tmp_path / "other.gguf"
    write_model(other, "llama")
    digest = _pull(store, small, "tiny", "latest")
    other_digest = _pull(store, other, "tiny", "q8")
    _pull(store, small, "tiny", "v1", namespace="someone")
    with capture_logs() as logs:
        default = resolve_model("ollama:tiny")
    assert Path(default) == tmp_path / "cache" / "gguf" / digest
    assert [e["event"] for e in logs] == ["model.converting", "model.converted"]
    assert resolve_model("ollama:tiny:latest") == default
    assert resolve_model("ollama:someone/tiny:v1") == default
    assert resolve_model("ollama:registry.ollama.ai/library/tiny") == default
    assert Path(resolve_model("ollama:tiny:q8")).name == other_digest
    # The digest is the content hash: nothing was hashed into the index, nothing copied.
    assert not (tmp_path / "cache" / "gguf" / "index.json").exists()
    copies = [p for p in (tmp_path / "cache").rglob("*")
              if p.is_file() and p.read_bytes()[:4] == b"GGUF"]
    assert copies == []


def test_a_model_that_was_not_pulled_names_where_it_looked(store: Path) -> None:
    with pytest.raises(EngineClientError) as caught:
        resolve_model("ollama:absent:7b")
    error = caught.value
    manifest = store / "manifests" / "registry.ollama.ai" / "library" / "absent" / "7b"
    assert error.code is Code.MODEL_LOAD_ERROR and not error.retryable
    assert str(manifest) in error.message and "ollama pull absent:7b" in error.message
    assert error.details["path"] == "ollama:absent:7b"


@pytest.mark.parametrize("name", ["", "a/b/c/d", "../x", "x:"])
def test_a_malformed_name_is_refused(name: str, store: Path) -> None:
    with pytest.raises(EngineClientError, match="not an Ollama model name"):
        find_ollama_model(name)


def test_a_missing_or_partial_blob_is_refused(store: Path, tmp_path: Path) -> None:
    small = tmp_path / "small.gguf"
    write_model(small, "llama")
    digest = _pull(store, small, "tiny", "latest")
    blob = store / "blobs" / f"sha256-{digest}"
    blob.unlink()
    blob.write_bytes(small.read_bytes()[:100])
    with pytest.raises(EngineClientError, match="an interrupted pull"):
        find_ollama_model("tiny")
    blob.unlink()
    with pytest.raises(EngineClientError, match="which is missing"):
        find_ollama_model("tiny")
