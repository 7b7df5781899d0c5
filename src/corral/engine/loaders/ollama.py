"""Models the user already pulled with Ollama, read from Ollama's local store.

The store is `$OLLAMA_MODELS`, else `~/.ollama/models`. A name
`[host/][namespace/]model[:tag]` (defaults `registry.ollama.ai`, `library`, `latest`,
as Ollama fills them) has its manifest at `manifests/<host>/<namespace>/<model>/<tag>`;
the manifest's layer of media type `application/vnd.ollama.image.model` names the GGUF
blob `blobs/sha256-<hex>` by its digest. The digest is the blob's content hash, so it
keys the conversion as it is: the blob is neither hashed again nor copied. The
`template` and `params` layers are Go templates and Ollama options, not read: the chat
template comes from the GGUF's own metadata.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from corral.engine.loaders.errors import model_load_error

__all__ = ["MODEL_MEDIA_TYPE", "OllamaModel", "find_ollama_model", "ollama_models_dir"]

MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
_DEFAULT_HOST = "registry.ollama.ai"
_DEFAULT_NAMESPACE = "library"
_DEFAULT_TAG = "latest"


class OllamaModel(msgspec.Struct, frozen=True):
    """A pulled Ollama model: its full name, manifest, GGUF blob and the blob's SHA-256."""

    name: str
    manifest: Path
    blob: Path
    sha256: str


class _Layer(msgspec.Struct, frozen=True, rename="camel"):
    media_type: str
    digest: str
    size: int = 0


class _Manifest(msgspec.Struct, frozen=True):
    layers: list[_Layer]


def ollama_models_dir() -> Path:
    """Ollama's store: `$OLLAMA_MODELS`, else `~/.ollama/models`."""
    if explicit := os.environ.get("OLLAMA_MODELS"):
        return Path(explicit).expanduser()
    return Path.home() / ".ollama" / "models"


def find_ollama_model(name: str, store: Path | None = None) -> OllamaModel:
    """The GGUF blob of the pulled Ollama model ``name`` (`llama3.2`, `qwen3:0.6b`,
    `user/model:tag`, `host/namespace/model:tag`).

    Raises:
        EngineClientError: ModelLoadError naming where it looked, when the name is
            malformed, was not pulled, or its manifest or blob is missing or damaged.
    """
    reference = f"ollama:{name}"
    store = store or ollama_models_dir()
    path, tag = name.rsplit(":", 1) if ":" in name.rsplit("/", 1)[-1] else (name, _DEFAULT_TAG)
    parts = path.split("/")
    if not all(parts) or len(parts) > 3 or not tag or ".." in name:
        raise model_load_error(reference, f"{reference}: not an Ollama model name "
                                          f"([host/][namespace/]model[:tag])")
    host, namespace, model = [_DEFAULT_HOST, _DEFAULT_NAMESPACE][:3 - len(parts)] + parts
    manifest = store / "manifests" / host / namespace / model / tag
    full = f"{host}/{namespace}/{model}:{tag}"
    try:
        layers = msgspec.json.decode(manifest.read_bytes(), type=_Manifest).layers
    except FileNotFoundError:
        raise model_load_error(reference, f"{reference}: no Ollama model {full} (no manifest "
                                          f"at {manifest}; `ollama pull {name}` fetches it)",
                               manifest=str(manifest)) from None
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as error:
        raise model_load_error(reference, f"{reference}: unreadable Ollama manifest "
                                          f"{manifest}: {error}",
                               manifest=str(manifest)) from None
    model_layers = [layer for layer in layers if layer.media_type == MODEL_MEDIA_TYPE]
    if not model_layers:
        raise model_load_error(reference, f"{reference}: the Ollama manifest {manifest} has "
                                          f"no {MODEL_MEDIA_TYPE} layer",
                               manifest=str(manifest))
    layer = model_layers[0]
    algorithm, _, digest = layer.digest.partition(":")
    if algorithm != "sha256" or len(digest) != 64:
        raise model_load_error(reference, f"{reference}: unexpected digest {layer.digest!r} "
                                          f"in {manifest}", manifest=str(manifest))
    # Ollama names blobs sha256-<hex>; older versions used sha256:<hex> outside Windows.
    candidates = [store / "blobs" / f"sha256-{digest}", store / "blobs" / f"sha256:{digest}"]
    for blob in candidates:
        if blob.is_file():
            if layer.size and blob.stat().st_size != layer.size:
                raise model_load_error(reference, f"{reference}: the blob {blob} has "
                                                  f"{blob.stat().st_size} bytes, its manifest "
                                                  f"says {layer.size} (an interrupted pull?)",
                                       blob=str(blob))
            return OllamaModel(name=full, manifest=manifest, blob=blob, sha256=digest)
    raise model_load_error(reference, f"{reference}: its manifest {manifest} names the blob "
                                      f"{candidates[0]}, which is missing",
                           blob=str(candidates[0]))
