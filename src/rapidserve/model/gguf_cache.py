"""What parsing a GGUF file yields, kept on disk so that the next start does not parse it again.

Parsing a GGUF file's metadata (gguf's GGUFReader) takes seconds on a CPU — the vocabulary alone
is tens of thousands of strings — and transformers parses the file a second time to build its
tokenizer. Both results depend on the file's bytes only, so they are cached, keyed by a hash of
the file (its size, its first 32 MiB — the metadata and the start of the tensor data — and its
last 4 MiB), in `$RAPIDSERVE_CACHE_DIR` (default `$XDG_CACHE_HOME/rapidserve`, else
`~/.cache/rapidserve`):

- `gguf/KEY/index.json`: the HF-style config and, per tensor, its name, GGUF type, shape and the
  byte range of its data (the weights are still read from the GGUF file itself, memory-mapped);
- `gguf/KEY/tokenizer/`: the converted tokenizer as transformers saves it.

A missing, partial or unreadable entry is rebuilt; a cache that cannot be written (read-only
home, full disk) is skipped with a debug log. `RAPIDSERVE_NO_CACHE=1` turns it off.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

log = logging.getLogger("rapidserve.model")

# Bump when what is cached changes meaning (the config translation, the index's fields).
CACHE_FORMAT = 1
_HEAD_BYTES = 32 << 20
_TAIL_BYTES = 4 << 20


def cache_root() -> Path | None:
    """The cache directory, or None when caching is off."""
    if os.environ.get("RAPIDSERVE_NO_CACHE", "") not in ("", "0"):
        return None
    if explicit := os.environ.get("RAPIDSERVE_CACHE_DIR"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rapidserve"


def file_key(path: str) -> str:
    """A hash of the file's size, head and tail (reads at most 36 MiB, ~50 ms; once per process
    while the file's size and modification time stay the same)."""
    st = os.stat(path)
    return _file_key(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _file_key(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256(f"rapidserve-gguf-{CACHE_FORMAT}".encode())
    h.update(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        h.update(f.read(_HEAD_BYTES))
        if size > _HEAD_BYTES:
            f.seek(max(_HEAD_BYTES, size - _TAIL_BYTES))
            h.update(f.read())
    return h.hexdigest()[:32]


def entry_dir(path: str) -> Path | None:
    root = cache_root()
    return None if root is None else root / "gguf" / file_key(path)


class IndexedTensor(NamedTuple):
    """A tensor of a GGUF file as the index records it: what `gguf.dequantize` needs (its GGUF
    type, and its data as the reader would view it), read lazily from the memory-mapped file."""

    name: str
    tensor_type: int
    shape: tuple[int, ...]  # GGUF order: innermost first
    file: np.memmap
    offset: int
    nbytes: int
    view_dtype: str  # the numpy dtype of the reader's view of the data
    view_shape: tuple[int, ...]

    @property
    def data(self) -> np.ndarray:
        raw = self.file[self.offset:self.offset + self.nbytes]
        return raw.view(np.dtype(self.view_dtype)).reshape(self.view_shape)


def tensor_entry(tensor: Any) -> dict[str, Any]:
    """The index's record of a gguf ReaderTensor."""
    return {"name": tensor.name, "type": int(tensor.tensor_type), "shape": [int(d) for d in tensor.shape],
            "offset": int(tensor.data_offset), "nbytes": int(tensor.n_bytes),
            "view_dtype": tensor.data.dtype.str, "view_shape": list(tensor.data.shape)}


def load_index(path: str) -> tuple[dict[str, Any], list[IndexedTensor]] | None:
    """(config, tensors) from the cache, or None when there is no usable entry."""
    entry = entry_dir(path)
    if entry is None:
        return None
    try:
        index = json.loads((entry / "index.json").read_text(encoding="utf-8"))
        if index.get("format") != CACHE_FORMAT:
            return None
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        tensors = [IndexedTensor(t["name"], int(t["type"]), tuple(t["shape"]), mm, int(t["offset"]),
                                 int(t["nbytes"]), t["view_dtype"], tuple(t["view_shape"]))
                   for t in index["tensors"]]
        if any(t.offset + t.nbytes > mm.size for t in tensors):
            return None
        return index["config"], tensors
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_index(path: str, config: dict[str, Any], tensors: list[dict[str, Any]]) -> None:
    _write(path, "index.json", lambda tmp: (tmp / "index.json").write_text(
        json.dumps({"format": CACHE_FORMAT, "source": os.path.abspath(path), "config": config,
                    "tensors": tensors}), encoding="utf-8"))


def load_tokenizer(path: str) -> Any | None:
    """The cached tokenizer, or None."""
    entry = entry_dir(path)
    if entry is None or not (entry / "tokenizer" / "tokenizer.json").is_file():
        return None
    # The fast tokenizer class itself: AutoTokenizer's class lookup costs ~1.5 s of imports.
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast.from_pretrained(str(entry / "tokenizer"), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_tokenizer(path: str, tokenizer: Any) -> None:
    _write(path, "tokenizer", lambda tmp: tokenizer.save_pretrained(str(tmp / "tokenizer")))


def _write(path: str, name: str, fill: Callable[[Path], Any]) -> None:
    """Write one item of the file's entry atomically: into a temporary directory beside it, then
    renamed into place (two processes filling the same entry at once both succeed)."""
    entry = entry_dir(path)
    if entry is None:
        return
    try:
        entry.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=entry))
        try:
            fill(tmp)
            os.replace(tmp / name, entry / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:  # a read-only or full disk: run without the cache
        log.debug("cannot write the GGUF cache for %s: %s", path, e)
