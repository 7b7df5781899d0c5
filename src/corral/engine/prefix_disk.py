"""The disk tier of the prefix cache: long prefixes kept as safetensors files.

A file holds one prefix's KV cache, written with `mlx_lm.models.cache.save_prompt_cache`
and read with `load_prompt_cache`. Its metadata names the model's identity and the
prefix's token ids, so a worker that restarts after a crash, or the next `corral serve`
run, finds what it can reuse by reading file headers only, and can never load another
model's KV. A BLAKE2 checksum of the token ids and the tensor bytes together, in the
header too, is checked before a file is used, and the tokens its header names must be
the ones the index expects (its name is their hash): a file whose KV was damaged, or
that was swapped with another prefix's file, is refused rather than decoded from.

Only regular files are read (`lstat`, then opened with O_NOFOLLOW | O_NONBLOCK and
checked again), so a FIFO or a device in `disk_dir` is skipped with a warning and can
never block the engine.

Writes happen in a writer thread, never in a step: a file is written under a temporary
name and renamed into place, so a crash mid-write leaves no half file under a real
name. Reads happen in the engine thread, when a lookup finds a longer prefix on disk
than in memory. A corrupt, truncated or foreign file is deleted with a warning and
counted; it never fails the engine. The directory is bounded in bytes, least recently
used first; a file counts at its size on disk once written (until then at its KV's
size), so while writes are queued the directory may pass the bound by what they add.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import stat
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final, cast

import structlog

from corral.engine.prefix_index import PrefixIndex

__all__ = ["DiskPrefixStore", "model_identity"]

_log = structlog.get_logger("corral.prefix_cache")

_FORMAT: Final = "corral-prefix-2"  # 2: the checksum covers the tokens too
_SUFFIX: Final = ".safetensors"
_TEMPORARY: Final = re.compile(r"^\.tmp-(\d+)-")
# save_prompt_cache stores its metadata dict as the first member of a flattened tree.
_META: Final = "0."
_MAX_HEADER: Final = 1 << 26
_CHECKSUM_KEY: Final = "corral_checksum"
_UNSUMMED: Final = "0" * 64  # written first, replaced in place by the real checksum
_CHUNK: Final = 1 << 20


def model_identity(path: str, config: dict[str, Any], model: Any) -> str:
    """A name for one model's weights: its path, its config, and the name, shape and
    dtype of every parameter. Two models that differ in any of these never share KV."""
    from mlx.utils import tree_flatten

    digest = hashlib.sha256()
    digest.update(os.path.realpath(path).encode())
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    # Without a `destination`, tree_flatten returns (name, array) pairs.
    parameters = cast(list[tuple[str, Any]], tree_flatten(model.parameters()))
    for name, array in parameters:
        digest.update(f"{name}:{tuple(array.shape)}:{array.dtype}".encode())
    return digest.hexdigest()[:32]


@dataclass
class _File:
    path: Path
    nbytes: int  # the KV's size until written, the file's size from then on
    written: bool  # False while the writer thread still has it queued


class DiskPrefixStore:
    """The cache files of one model under `directory/<identity>/`.

    Everything but the writer thread runs in the engine thread.

    Args:
        directory: the configured `disk_dir`.
        identity: `model_identity` of the loaded model.
        max_bytes: bound on this model's files; the least recently used go first.
        min_tokens: shorter prefixes are not written.
    """

    def __init__(self, directory: str, identity: str, *, max_bytes: int,
                 min_tokens: int) -> None:
        self._directory = Path(directory) / identity
        self._identity = identity
        self._max_bytes = max_bytes
        self.min_tokens = min_tokens
        self._files: OrderedDict[str, _File] = OrderedDict()  # least recently used first
        self._index: PrefixIndex[str] = PrefixIndex()
        self._bytes = 0
        # Guards what the writer thread touches: the counters, a file's rename into place
        # against its deletion, and the sizes of the files it wrote.
        self._lock = threading.Lock()
        self._written: list[tuple[str, int]] = []
        self.writes = 0
        self.loads = 0
        self.errors = 0
        self._jobs: queue.SimpleQueue[tuple[str, Path, list[Any], dict[str, str]] | None] = (
            queue.SimpleQueue())
        self._writer: threading.Thread | None = None
        self._directory.mkdir(parents=True, exist_ok=True)
        self._scan()

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._files)

    def longest(self, tokens: list[int]) -> tuple[str | None, int]:
        """The written file sharing the longest prefix with `tokens`, and that length."""
        self._absorb()
        name, length = self._index.longest(tokens)
        if name is None or not self._files[name].written:
            return None, 0
        return name, length

    def covers(self, tokens: list[int]) -> bool:
        """A file (written or queued) holds all of `tokens` already."""
        _, length = self._index.longest(tokens)
        return length == len(tokens)

    def load(self, name: str) -> tuple[list[int], list[Any]] | None:
        """Read one file back: its tokens and KV cache (evaluated), or None if it is bad
        (then it is deleted, with a warning)."""
        import mlx.core as mx
        from mlx_lm.models.cache import load_prompt_cache

        file = self._files[name]
        tokens = self._index.tokens(name)
        try:
            _verify(file.path, tokens)
            cache, metadata = load_prompt_cache(str(file.path), return_metadata=True)
            mx.eval([c.state for c in cache])
            if metadata.get("corral_model") != self._identity or any(
                c.size() != len(tokens) for c in cache
            ) or metadata.get("corral_tokens") != _tokens_json(tokens):
                raise ValueError("the file does not hold this model's prefix")
        except Exception as exc:
            self._reject(name, file.path, exc)
            return None
        self._files.move_to_end(name)
        _touch(file.path)
        self.loads += 1
        return tokens, cache

    def store(self, tokens: list[int], cache: list[Any]) -> None:
        """Queue one prefix (its KV already evaluated) for writing, unless a file holds
        it already. Files it extends are deleted; the oldest go until the bound holds."""
        self._absorb()
        nbytes = sum(c.nbytes for c in cache)
        if len(tokens) < self.min_tokens or nbytes > self._max_bytes or self.covers(tokens):
            return
        for covered in self._index.prefixes_of(tokens):
            self._delete(covered)
        while self._files and self._bytes + nbytes > self._max_bytes:
            self._delete(next(iter(self._files)))
        name = _name(tokens)
        path = self._directory / f"{name}{_SUFFIX}"
        self._files[name] = _File(path, nbytes, written=False)
        self._index.add(name, tokens)
        self._bytes += nbytes
        metadata = {"corral_format": _FORMAT, "corral_model": self._identity,
                    "corral_tokens": _tokens_json(tokens),
                    _CHECKSUM_KEY: _UNSUMMED}
        self._jobs.put((name, path, cache, metadata))
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, daemon=True,
                                            name="corral-prefix-writer")
            self._writer.start()

    def close(self, timeout: float = 10.0) -> None:
        """Finish the queued writes (up to `timeout` seconds), then stop the writer."""
        if self._writer is not None:
            self._jobs.put(None)
            self._writer.join(timeout)
        self._absorb()

    # -- engine thread ---------------------------------------------------------------

    def _scan(self) -> None:
        """Index the files a previous run left; delete what cannot be used, and leave
        alone (with a warning) what is not a regular file."""
        found = []
        for path in self._directory.iterdir():
            match = _TEMPORARY.match(path.name)
            if match is not None:
                if not _alive(int(match.group(1))):
                    path.unlink(missing_ok=True)  # a write its process never finished
                continue
            if not path.name.endswith(_SUFFIX):
                continue
            info = path.lstat()
            if not stat.S_ISREG(info.st_mode):
                _log.warning("prefix_cache.skipped_file", path=str(path),
                             reason="not a regular file")
                with self._lock:
                    self.errors += 1
                continue
            try:
                tokens = self._read_tokens(path)
                if path.name != f"{_name(tokens)}{_SUFFIX}":
                    raise ValueError("the file's name is not that of the prefix it holds")
                found.append((info.st_mtime, path, tokens, info.st_size))
            except Exception as exc:
                self._reject(None, path, exc)
        for _, path, tokens, nbytes in sorted(found, key=lambda item: item[0]):
            name = path.name[: -len(_SUFFIX)]
            self._files[name] = _File(path, nbytes, written=True)
            self._index.add(name, tokens)
            self._bytes += nbytes
        while self._files and self._bytes > self._max_bytes:
            self._delete(next(iter(self._files)))

    def _read_tokens(self, path: Path) -> list[int]:
        """The prefix a file holds, from its safetensors header alone; raises if the
        file is truncated or not a cache file of this model."""
        with _open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            start, raw = _header(f)
        if start > size:
            raise ValueError("truncated inside the header")
        header = json.loads(raw)
        metadata = header.pop("__metadata__", {})
        if metadata.get(_META + "corral_format") != _FORMAT:
            raise ValueError("not a corral prefix cache file")
        if metadata.get(_META + "corral_model") != self._identity:
            raise ValueError("the file belongs to another model")
        end = max((t["data_offsets"][1] for t in header.values()), default=0)
        if start + end != size:
            raise ValueError(f"truncated: {size} bytes, the header says {start + end}")
        tokens = json.loads(metadata[_META + "corral_tokens"])
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise ValueError("bad token list")
        return tokens

    def _reject(self, name: str | None, path: Path, error: BaseException) -> None:
        _log.warning("prefix_cache.bad_file", path=str(path), error=repr(error))
        with self._lock:
            self.errors += 1
        if name is not None:
            self._forget(name)
        path.unlink(missing_ok=True)

    def _absorb(self) -> None:
        """Count written files at their size on disk, then evict until the bound holds."""
        with self._lock:
            written, self._written = self._written, []
        for name, size in written:
            file = self._files.get(name)
            if file is not None:
                self._bytes += size - file.nbytes
                file.nbytes = size
        while self._files and self._bytes > self._max_bytes:
            self._delete(next(iter(self._files)))

    def _delete(self, name: str) -> None:
        # Under the lock, so that the writer renames a file into place only while it is
        # wanted; a file still queued is dropped by the writer, which sees it is gone.
        with self._lock:
            file = self._forget(name)
            if file is not None and file.written:
                file.path.unlink(missing_ok=True)

    def _forget(self, name: str) -> _File | None:
        file = self._files.pop(name, None)
        if file is not None:
            self._index.remove(name)
            self._bytes -= file.nbytes
        return file

    # -- writer thread ---------------------------------------------------------------

    def _write_loop(self) -> None:
        from mlx_lm.models.cache import save_prompt_cache

        while (job := self._jobs.get()) is not None:
            name, path, cache, metadata = job
            temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
            try:
                save_prompt_cache(str(temporary), cache, metadata)
                _seal(temporary)
                with self._lock:
                    file = self._files.get(name)
                    if file is None or file.path != path:
                        temporary.unlink(missing_ok=True)  # deleted while queued
                        continue
                    os.replace(temporary, path)
                    file.written = True
                    self._written.append((name, path.stat().st_size))
                    self.writes += 1
            except Exception as exc:
                temporary.unlink(missing_ok=True)
                _log.warning("prefix_cache.write_failed", path=str(path), error=repr(exc))
                with self._lock:
                    self.errors += 1


def _header(f: Any) -> tuple[int, bytes]:
    """The safetensors header of an open file: where its data starts, and its bytes."""
    (length,) = struct.unpack("<Q", f.read(8))
    if not 0 < length <= _MAX_HEADER:
        raise ValueError("bad safetensors header length")
    return 8 + length, f.read(length)


def _name(tokens: list[int]) -> str:
    """The file name (without suffix) of the prefix `tokens`."""
    return hashlib.sha256(struct.pack(f"<{len(tokens)}I", *tokens)).hexdigest()[:40]


def _tokens_json(tokens: list[int]) -> str:
    """The token ids as the header holds them, and as the checksum covers them."""
    return json.dumps(tokens, separators=(",", ":"))


def _open_regular(path: Path) -> BinaryIO:
    """`path` opened for reading, if it is a regular file (no symlink followed, and a
    FIFO opened without blocking, then refused).

    Raises:
        OSError: it cannot be opened (ELOOP for a symlink).
        ValueError: it is not a regular file.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError("not a regular file")
    return os.fdopen(fd, "rb")


def _checksum(f: Any, start: int, tokens: str) -> str:
    """BLAKE2 of the token ids (as `_tokens_json` writes them) and the tensor bytes
    from `start` on, so neither can be changed or swapped without the other."""
    digest = hashlib.blake2b(digest_size=32)
    digest.update(tokens.encode())
    f.seek(start)
    while chunk := f.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _seal(path: Path) -> None:
    """Write the checksum of a file's tokens and tensor bytes over the placeholder in
    its header (the same length, so nothing moves)."""
    placeholder = f'"{_META}{_CHECKSUM_KEY}":"{_UNSUMMED}"'.encode()
    with path.open("r+b") as f:
        start, header = _header(f)
        at = header.find(placeholder)
        if at < 0:
            raise ValueError("no checksum placeholder in the header")
        tokens = json.loads(header)["__metadata__"][_META + "corral_tokens"]
        checksum = _checksum(f, start, tokens)
        f.seek(8 + at + len(placeholder) - len(_UNSUMMED) - 1)
        f.write(checksum.encode())


def _verify(path: Path, tokens: list[int]) -> None:
    """Raise unless the file is a regular file whose header names `tokens` and whose
    checksum matches those tokens and its tensor bytes."""
    with _open_regular(path) as f:
        start, header = _header(f)
        metadata = json.loads(header).get("__metadata__", {})
        expected = _tokens_json(tokens)
        if metadata.get(_META + "corral_tokens") != expected:
            raise ValueError("the file holds another prefix than the index expects")
        checksum = metadata.get(_META + _CHECKSUM_KEY)
        if checksum in (None, _UNSUMMED) or _checksum(f, start, expected) != checksum:
            raise ValueError("the tokens and tensor bytes do not match the file's checksum")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass
