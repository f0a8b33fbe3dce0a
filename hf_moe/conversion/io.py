"""Checkpoint I/O for conversions: read Hugging Face checkpoint folders lazily, write sharded safetensors as a
stream, and publish an output folder atomically.

- :class:`CheckpointReader` validates a source folder up front (config, index, every shard's safetensors header
  and size) so that a broken input fails before any output is written, then hands out one tensor at a time.
- :class:`ShardWriter` writes each tensor straight to disk as it is added (only the safetensors header is kept in
  memory), starts a new shard when the current one would pass ``max_shard_size``, and at the end renames the
  shards to ``model-0000x-of-0000n.safetensors`` and writes ``model.safetensors.index.json``. Bytes that already
  sit in a file (a source tensor copied unchanged, :meth:`CheckpointReader.stored`; a repeated expert) are copied
  inside the kernel (``copy_file_range``) instead of through the process's memory.
- :func:`atomic_output_dir` builds the output in a temporary folder beside the destination and renames it into
  place only on success (fsynced first; an existing output is swapped out atomically, and leftovers of a killed
  run are recovered or removed by the next one). :func:`check_no_overlap` is the one rule that keeps an output
  away from the inputs, and :func:`atomic_open` / :func:`atomic_write` write single files the same way.

Example:
```python
>>> from hf_moe.conversion.io import CheckpointReader, ShardWriter, atomic_output_dir
>>> with CheckpointReader("dense/") as src, atomic_output_dir("out/") as tmp:
...     with ShardWriter(tmp, max_shard_size="2GB") as writer:
...         for name in src.keys():
...             writer.add(name, src.get_tensor(name))
```
"""

from __future__ import annotations

import ctypes  # renameat2, which the os module does not wrap
import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import struct
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import SafetensorError, safe_open

from ..hub_ids import hub_origin  # a Hub download is recorded as repo id + commit

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_WEIGHT_PATTERNS = ("pytorch_model*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.bin")
PROVENANCE_NAME = "hf_moe_provenance.json"

# Files that belong to the tokenizer (and generation defaults) and travel unchanged with converted weights.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "generation_config.json",
)
TOKENIZER_GLOBS = ("chat_template.*", "*.tiktoken")

# safetensors dtype names (format spec) <-> torch dtypes.
_DTYPE_TO_ST: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_ST_TO_DTYPE = {v: k for k, v in _DTYPE_TO_ST.items()}
_ST_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}
_MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library enforces

CONVERT_HINT = (
    'python -c "from transformers import AutoModelForCausalLM; '
    "AutoModelForCausalLM.from_pretrained('SRC').save_pretrained('SRC_SAFETENSORS')\""
)


# ================================================================================================================
# Small helpers.
# ================================================================================================================


def parse_size(size: int | str) -> int:
    """Bytes in a size such as ``2GB`` (10**9, as transformers), ``500MiB`` (2**20) or an int.

    Raises:
        ValueError: the string is not a size.
    """
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(size), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot parse size {size!r}: use e.g. '2GB', '500MB', '1GiB' or a number of bytes")
    number, unit = float(match.group(1)), match.group(2).upper()
    prefix = unit[:1] if unit[:1] in "KMGT" else ""
    base = 1024 if "I" in unit else 1000
    value = int(number * base ** (" KMGT".index(prefix) if prefix else 0))
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


def sha256_file(path: str | os.PathLike, *, chunk_size: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def read_safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """Parse and validate the header of a safetensors file without reading tensor data.

    The one header reader of the package (conversions, cards, inspect). Checks what the safetensors library
    checks when it opens a file, so that a file accepted here also loads: the header is a JSON object, each entry
    has a known dtype, a shape of non-negative ints and byte offsets matching dtype x shape, the tensors tile the
    data section without gaps or overlaps, and the file size equals header + data (a truncated or padded file is
    refused). Every error names the file.

    Returns:
        The header dict: ``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a complete safetensors file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    fix = "re-download or re-save it"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file (only {size} bytes); {fix}")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise ValueError(
                f"{path} has a corrupt or truncated safetensors header (header length {header_len}, file size "
                f"{size}); {fix}"
            )
        try:
            header = json.loads(f.read(header_len).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} has an unreadable safetensors header ({err}); {fix}") from err
    if not isinstance(header, dict):
        raise ValueError(f"{path} has a malformed safetensors header (not a JSON object); {fix}")  # noqa: TRY004
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: the safetensors __metadata__ must map strings to strings; {fix}")
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            shape, dtype = info["shape"], info["dtype"]
            if not all(type(x) is int and x >= 0 for x in (start, end, *shape)):
                raise ValueError("offsets and dimensions must be non-negative integers")
            numel = 1
            for dim in shape:
                numel *= dim
            expected = numel * _ST_ITEMSIZE[dtype]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: malformed header entry for tensor {name!r} ({err!r}); {fix}") from err
        if end - start != expected:
            raise ValueError(
                f"{path}: tensor {name!r} spans {end - start} bytes but its dtype {dtype} and shape {shape} need "
                f"{expected}; {fix}"
            )
        spans.append((start, end, name))
    data_end = 0
    for start, end, name in sorted(spans):
        if start != data_end:  # the library refuses holes and overlaps between tensors
            raise ValueError(f"{path}: tensor {name!r} starts at byte {start}, expected {data_end}; {fix}")
        data_end = end
    if size != 8 + header_len + data_end:
        raise ValueError(
            f"{path} is truncated or corrupt: its header describes {8 + header_len + data_end} bytes but the file "
            f"has {size}; {fix}"
        )
    return header


def index_entry_path(root: str | os.PathLike, name: object) -> Path:
    """`root / name` for a weights file named by ``model.safetensors.index.json``, refusing names that leave the
    folder (an absolute path, ``..``) or are not plain file names.

    Symbolic links inside the folder are followed wherever they point: the Hugging Face Hub cache stores every
    snapshot file as a link into ``../../blobs``, and the user chose that folder.

    Raises:
        ValueError: the entry points outside `root`.
    """
    root = Path(root)
    candidate = Path(name) if isinstance(name, str) else None
    if candidate is None or not name or candidate.is_absolute() or ".." in candidate.parts:
        raise ValueError(
            f"{root / SAFE_WEIGHTS_INDEX_NAME} names weights file {name!r} outside the checkpoint folder; an index "
            "may only name files inside its own folder. Re-download the checkpoint or fix the index"
        )
    return root / candidate


# ================================================================================================================
# Reading.
# ================================================================================================================


@dataclass(frozen=True)
class StoredTensor:
    """A tensor's bytes where they lie in a safetensors file, not read into memory.

    :class:`ShardWriter` takes it wherever it takes a tensor and copies the file range (inside the kernel where the
    platform allows), which is how unchanged source tensors travel into a converted checkpoint.

    Attributes:
        path: the safetensors file.
        offset: absolute byte offset of the tensor's data in `path`.
        nbytes: length of the data.
        shape: tensor shape.
        dtype: torch dtype.
    """

    path: Path
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


class CheckpointReader:
    """A Hugging Face checkpoint folder (``config.json`` + ``model.safetensors`` or sharded safetensors with
    ``model.safetensors.index.json``), validated when opened and read one tensor at a time.

    Files are opened read-only; nothing in the folder is modified. Tensors are read with plain reads at the
    offsets of the validated header (``mmap=True`` uses ``safetensors.safe_open`` instead, whose memory-mapped
    pages stay resident while the shard is open).

    Args:
        src_dir: the checkpoint folder.
        mmap: read through ``safe_open`` memory maps instead of plain reads.

    Raises:
        FileNotFoundError: the folder, ``config.json`` or a weights file named by the index is missing.
        ValueError: pickle-only weights, a corrupt/truncated shard, an index naming files outside the folder or
            tensors a shard does not hold, or an unreadable config.
    """

    def __init__(self, src_dir: str | os.PathLike, *, mmap: bool = False):
        self.mmap = mmap
        self.root = Path(src_dir)
        if not self.root.is_dir():
            raise FileNotFoundError(f"checkpoint folder {self.root} does not exist or is not a directory")
        config_path = self.root / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(
                f"{config_path} is missing: a Hugging Face checkpoint folder needs config.json"
            )
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(
                f"{config_path} is not valid JSON ({err}); re-download or re-save the checkpoint"
            ) from err
        if not isinstance(self.config, dict):
            raise ValueError(  # noqa: TRY004 (bad file content, like every other checkpoint error)
                f"{config_path} must hold a JSON object of config fields; re-save the checkpoint"
            )
        self.files_read: list[Path] = [config_path]
        self.weight_map: dict[str, str] = self._find_weights()
        file_names = list(dict.fromkeys(self.weight_map.values()))
        self.files: list[Path] = [self.root / f for f in file_names]
        # Every shard's header and size is checked now, before the caller writes any output.
        self._headers: dict[str, dict[str, Any]] = {
            f: read_safetensors_header(self.root / f) for f in file_names
        }
        self._check_index()
        self.files_read.extend(self.files)
        self._handles: dict[str, Any] = {}
        self._data_start: dict[str, int] = {}

    def _find_weights(self) -> dict[str, str]:
        single, index = self.root / SAFE_WEIGHTS_NAME, self.root / SAFE_WEIGHTS_INDEX_NAME
        if single.is_file():  # transformers prefers the single file too
            header = read_safetensors_header(single)
            return {name: SAFE_WEIGHTS_NAME for name in header if name != "__metadata__"}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("'weight_map' is not an object")
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(
                    f"{index} is not a valid safetensors index (needs a 'weight_map' of tensor name -> file): "
                    f"{err!r}; re-download the checkpoint"
                ) from err
            self.files_read.append(index)
            for file_name in dict.fromkeys(weight_map.values()):
                path = index_entry_path(self.root, file_name)
                if not path.is_file():
                    raise FileNotFoundError(
                        f"{index} names weights file {file_name!r}, which is missing from {self.root}; re-download "
                        "the checkpoint"
                    )
            return dict(weight_map)
        pickles = sorted({p.name for pattern in PICKLE_WEIGHT_PATTERNS for p in self.root.glob(pattern)})
        if pickles:
            raise ValueError(
                f"{self.root} holds only pickle weights ({', '.join(pickles)}); hf_moe reads safetensors only, since "
                f"unpickling can run arbitrary code. Convert the folder first, e.g. {CONVERT_HINT}"
            )
        raise FileNotFoundError(
            f"{self.root} has no weights: expected {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} with its shards"
        )

    def _check_index(self) -> None:
        for name, file_name in self.weight_map.items():
            if name not in self._headers[file_name]:
                raise ValueError(
                    f"{self.root / SAFE_WEIGHTS_INDEX_NAME} places tensor {name!r} in {file_name}, which does not "
                    "hold it; the index and the shards do not belong together"
                )

    # --- tensor metadata (no data read) -------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Names of all tensors, in index order."""
        return list(self.weight_map)

    def __contains__(self, name: object) -> bool:
        return name in self.weight_map

    def _info(self, name: str) -> dict[str, Any]:
        if name not in self.weight_map:
            raise KeyError(f"tensor {name!r} is not in the checkpoint {self.root}")
        return self._headers[self.weight_map[name]][name]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name`, from the header."""
        return tuple(self._info(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        """torch dtype of tensor `name`, from the header."""
        st = self._info(name)["dtype"]
        if st not in _ST_TO_DTYPE:
            raise ValueError(f"tensor {name!r} in {self.root} has dtype {st}, which torch cannot hold")
        return _ST_TO_DTYPE[st]

    def nbytes(self, name: str) -> int:
        start, end = self._info(name)["data_offsets"]
        return end - start

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    # --- tensor data ------------------------------------------------------------------------------------------
    def get_tensor(self, name: str) -> torch.Tensor:
        """Load one tensor (CPU), opening its shard on first use.

        Raises:
            KeyError: no tensor of that name.
        """
        file_name = self.weight_map.get(name)
        if file_name is None:
            raise KeyError(f"tensor {name!r} is not in the checkpoint {self.root}")
        handle = self._handles.get(file_name)
        if self.mmap:
            try:
                if handle is None:
                    handle = self._handles[file_name] = safe_open(
                        str(self.root / file_name), framework="pt", device="cpu"
                    )
                return handle.get_tensor(name)
            except SafetensorError as err:  # the library's messages do not name the file
                raise ValueError(
                    f"{self.root / file_name}: safetensors cannot read {name!r} ({err}); was it modified?"
                ) from err
        # Default: a plain read of the tensor's bytes (offsets from the header validated at open) into a fresh
        # tensor. Memory-mapped pages of a multi-GB shard would stay resident and count towards the process's
        # memory until the map is closed; read() keeps the peak at the tensors actually held.
        if handle is None:
            handle = self._handles[file_name] = open(self.root / file_name, "rb")  # noqa: SIM115 (closed in close())
        info = self._headers[file_name][name]
        start, end = info["data_offsets"]
        data_start = self._data_offset(file_name)
        buffer = torch.empty(end - start, dtype=torch.uint8)
        if end > start:
            handle.seek(data_start + start)
            if handle.readinto(memoryview(buffer.numpy())) != end - start:
                raise ValueError(
                    f"{self.root / file_name} ended early while reading {name!r}; was it modified?"
                )
        return buffer.view(self.dtype(name)).reshape(info["shape"])

    def _data_offset(self, file_name: str) -> int:
        """Where the tensor data of shard `file_name` starts: after the 8-byte length and the JSON header."""
        data_start = self._data_start.get(file_name)
        if data_start is None:
            with open(self.root / file_name, "rb") as handle:
                data_start = self._data_start[file_name] = 8 + struct.unpack("<Q", handle.read(8))[0]
        return data_start

    def stored(self, name: str) -> StoredTensor:
        """Where tensor `name`'s bytes lie (nothing is read): hand it to :class:`ShardWriter` to copy the tensor
        unchanged without passing it through memory.

        Raises:
            KeyError: no tensor of that name.
        """
        info = self._info(name)
        file_name = self.weight_map[name]
        start, end = info["data_offsets"]
        return StoredTensor(
            path=self.root / file_name,
            offset=self._data_offset(file_name) + start,
            nbytes=end - start,
            shape=tuple(info["shape"]),
            dtype=self.dtype(name),
        )

    def close(self) -> None:
        """Release the open shards (file handles / memory maps)."""
        for handle in self._handles.values():
            if hasattr(handle, "close"):
                handle.close()
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def largest_file_bytes(self) -> int:
        return max(p.stat().st_size for p in self.files)


def check_floating_weights(reader: CheckpointReader, names: Iterable[str] | None = None) -> None:
    """Refuse integer tensors among `names` (default: all): model weights are floating point, and an integer
    tensor (a quantised or corrupt checkpoint) would be converted into weights that compute garbage.

    Raises:
        ValueError: naming the folder, the first such tensor and its dtype.
    """
    bad = [n for n in (reader.keys() if names is None else names) if not reader.dtype(n).is_floating_point]
    if bad:
        raise ValueError(
            f"{reader.root}: tensor {bad[0]!r} has dtype {reader.dtype(bad[0])}"
            + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
            + "; model weights must be floating point. Quantised checkpoints cannot be converted: convert the "
            "unquantised one, or re-save the checkpoint if it is corrupt"
        )


# ================================================================================================================
# Writing.
# ================================================================================================================


_COPY_CHUNK = 64 << 20  # bytes per copy_file_range call / per fallback read


def _copy_range(src: IO[bytes], src_offset: int, dst: IO[bytes], dst_offset: int, nbytes: int) -> None:
    """Copy `nbytes` from `src` at `src_offset` to `dst` at `dst_offset` (both flushed, the ranges disjoint).

    ``os.copy_file_range`` copies inside the kernel: the bytes never pass through this process's memory, which on
    some machines is several times faster than ``write()`` of the same bytes (BENCHMARKS.md, upcycling). Where the
    platform or the file systems refuse it, the bytes go through a bounded buffer instead.
    """
    src_fd, dst_fd = src.fileno(), dst.fileno()
    done = 0
    copy_file_range = getattr(os, "copy_file_range", None)  # Linux only
    while copy_file_range is not None and done < nbytes:
        try:
            n = copy_file_range(
                src_fd, dst_fd, min(_COPY_CHUNK, nbytes - done), src_offset + done, dst_offset + done
            )
        except OSError as err:
            if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM):
                raise
            break  # e.g. across file systems on an older kernel: fall back below
        if n == 0:
            raise ValueError(f"{src.name} ended {nbytes - done} bytes early while copying; was it modified?")
        done += n
    while done < nbytes:
        chunk = os.pread(src_fd, min(_COPY_CHUNK, nbytes - done), src_offset + done)
        if not chunk:
            raise ValueError(f"{src.name} ended {nbytes - done} bytes early while copying; was it modified?")
        view = memoryview(chunk)
        while view:
            n = os.pwrite(dst_fd, view, dst_offset + done)
            view, done = view[n:], done + n


class ShardWriter:
    """Streaming writer of sharded safetensors checkpoints.

    Each added tensor is written to the current shard file at once; memory holds only the headers. Space for the
    header is reserved at the start of each shard (``header_reserve`` bytes, padded with spaces, which the
    safetensors format allows); a shard is closed when the next tensor would push it past ``max_shard_size`` or
    its header past the reserve. A tensor larger than ``max_shard_size`` gets a shard of its own (as transformers
    does). :meth:`finalize` renames the shards to ``{prefix}-0000x-of-0000n.safetensors`` and writes the index
    with ``metadata.total_size``; a single shard is written as ``{prefix}.safetensors`` without an index,
    following ``save_pretrained``.

    Args:
        out_dir: existing folder to write into (normally the temporary folder of :func:`atomic_output_dir`).
        max_shard_size: largest shard, e.g. ``"2GB"`` or bytes.
        prefix: file name prefix, ``"model"`` for transformers checkpoints.
        header_reserve: bytes reserved per shard for its JSON header (~100 bytes per tensor).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        max_shard_size: int | str = "2GB",
        prefix: str = "model",
        header_reserve: int = 1 << 18,
    ):
        self.out_dir = Path(out_dir)
        if not self.out_dir.is_dir():
            raise FileNotFoundError(f"output folder {self.out_dir} does not exist")
        self.max_shard_size = parse_size(max_shard_size)
        self.prefix = prefix
        self.header_reserve = (header_reserve + 7) // 8 * 8  # keeps tensor data 8-byte aligned
        self.shards: list[dict[str, Any]] = []  # {"path", "header", "size"}
        self._file = None
        self._names: set[str] = set()
        self.total_size = 0
        self.finalized: list[Path] | None = None

    # --- shard lifecycle ----------------------------------------------------------------------------------------
    def _open_shard(self) -> None:
        path = self.out_dir / f".{self.prefix}-{len(self.shards) + 1:05d}.safetensors.partial"
        self._file = open(path, "w+b")  # noqa: SIM115 (closed in _close_shard / abort); readable: repeated parts are copied from it
        self._file.write(b"\0" * (8 + self.header_reserve))
        self.shards.append({"path": path, "header": {}, "size": 0})

    @staticmethod
    def _header_bytes(header: dict[str, Any]) -> bytes:
        return json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()

    def _close_shard(self) -> None:
        if self._file is None:
            return
        shard = self.shards[-1]
        raw = self._header_bytes(shard["header"])
        self._file.seek(0)
        self._file.write(struct.pack("<Q", self.header_reserve))
        self._file.write(raw.ljust(self.header_reserve, b" "))
        self._file.close()
        self._file = None

    def add(self, name: str, tensor: torch.Tensor | StoredTensor) -> None:
        """Write `tensor` under `name` (CPU copy, contiguous; a :class:`StoredTensor` is copied from its file).
        Names must be unique.

        Raises:
            ValueError: a duplicate name or an unsupported dtype.
        """
        self.add_stacked(name, [tensor], stack=False)

    def add_stacked(
        self, name: str, parts: Sequence[torch.Tensor | StoredTensor], *, stack: bool = True
    ) -> None:
        """Write ``torch.stack(parts)`` under `name` without building the stacked tensor: each part's bytes are
        written in turn. A part that repeats an earlier one (the same tensor, or a view of the same memory with
        the same shape and strides, e.g. identical experts) is written once and then copied inside the output
        file; a :class:`StoredTensor` is copied from its file. Neither passes through the process's memory where
        the platform has ``copy_file_range``.

        Args:
            name: tensor name.
            parts: tensors or stored tensors of one shape and dtype (the same object may repeat).
            stack: False writes the single part as is (no leading dimension).

        Raises:
            ValueError: a duplicate name, an unsupported dtype, or parts that differ in shape/dtype.
        """
        if self.finalized is not None:
            raise ValueError("ShardWriter.add after finalize(); create a new writer")
        if name in self._names:
            raise ValueError(f"tensor {name!r} was already written")
        if not parts or (not stack and len(parts) != 1):
            raise ValueError(f"tensor {name!r}: give one tensor, or a non-empty list of parts to stack")
        first = parts[0]
        if any(tuple(p.shape) != tuple(first.shape) or p.dtype != first.dtype for p in parts):
            raise ValueError(f"tensor {name!r}: the parts to stack differ in shape or dtype")
        if first.dtype not in _DTYPE_TO_ST:
            raise ValueError(f"tensor {name!r} has dtype {first.dtype}, which safetensors cannot store")
        shape = [len(parts), *first.shape] if stack else list(first.shape)
        part_bytes = math.prod(first.shape) * first.dtype.itemsize
        if any(isinstance(p, StoredTensor) and p.nbytes != part_bytes for p in parts):
            raise ValueError(
                f"tensor {name!r}: a stored part's byte length does not match its shape and dtype"
            )
        nbytes = part_bytes * len(parts)
        entry_bytes = (
            len(json.dumps({name: {"dtype": "F64", "shape": shape, "data_offsets": [10**15, 10**15]}})) + 1
        )
        if entry_bytes + 64 > self.header_reserve:
            raise ValueError(f"tensor name {name!r} is too long for the shard header reserve")
        shard = self.shards[-1] if self.shards else None
        if (
            shard is None
            or self._file is None
            or (shard["size"] > 0 and shard["size"] + nbytes > self.max_shard_size)
            or len(self._header_bytes(shard["header"])) + entry_bytes > self.header_reserve
        ):
            self._close_shard()
            self._open_shard()
            shard = self.shards[-1]
        start = shard["size"]
        if nbytes:
            self._write_parts(parts, part_bytes)
        shard["header"][name] = {
            "dtype": _DTYPE_TO_ST[first.dtype],
            "shape": shape,
            "data_offsets": [start, start + nbytes],
        }
        shard["size"] += nbytes
        self.total_size += nbytes
        self._names.add(name)

    def _write_parts(self, parts: Sequence[torch.Tensor | StoredTensor], part_bytes: int) -> None:
        """Append the parts' bytes to the open shard: stored parts copied from their files, a tensor seen before
        in `parts` copied from where it was written in this shard, other tensors written from memory."""
        file = self._file
        assert file is not None
        # Memory identity of a tensor part -> its offset in this shard file.
        written_at: dict[tuple[Any, ...], int] = {}
        for part in parts:
            if isinstance(part, StoredTensor):
                file.flush()
                with open(part.path, "rb") as src:
                    _copy_range(src, part.offset, file, file.tell(), part_bytes)
                file.seek(0, os.SEEK_END)
                continue
            # Views of the same memory with the same layout hold the same bytes (`parts` keeps them alive).
            key = (part.untyped_storage().data_ptr(), part.storage_offset(), tuple(part.shape), part.stride())
            key += (part.dtype, part.device)
            if key in written_at:
                file.flush()
                _copy_range(file, written_at[key], file, file.tell(), part_bytes)
                file.seek(0, os.SEEK_END)
                continue
            written_at[key] = file.tell()
            data = part.detach().to("cpu").contiguous()
            # A uint8 view writes the raw bytes of any dtype (bfloat16 included) without a copy.
            file.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))

    def finalize(self) -> list[Path]:
        """Close the last shard, give every shard its final name and write the index (when sharded).

        Returns:
            The weight files written (final names).
        """
        if self.finalized is not None:
            return self.finalized
        self._close_shard()
        n = len(self.shards)
        written: list[Path] = []
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(self.shards, start=1):
            final = self.prefix + (".safetensors" if n == 1 else f"-{i:05d}-of-{n:05d}.safetensors")
            os.replace(shard["path"], self.out_dir / final)
            written.append(self.out_dir / final)
            weight_map.update({name: final for name in shard["header"]})
        if n == 0:  # no tensors: still a valid (empty) checkpoint file
            path = self.out_dir / f"{self.prefix}.safetensors"
            raw = self._header_bytes({})
            path.write_bytes(struct.pack("<Q", len(raw)) + raw)
            written.append(path)
        if n > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (self.out_dir / f"{self.prefix}.safetensors.index.json").write_text(
                json.dumps(index, indent=2) + "\n"
            )
        self.finalized = written
        return written

    def abort(self) -> None:
        """Close and delete the shards written so far."""
        if self._file is not None:
            self._file.close()
            self._file = None
        for shard in self.shards:
            Path(shard["path"]).unlink(missing_ok=True)
        self.shards.clear()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


# ================================================================================================================
# Atomic output folders, tokenizer files, provenance.
# ================================================================================================================

# Hidden siblings of an output: ``.<name>.tmp-<pid>-<hex>`` (being built, or the old output after an atomic swap)
# and ``.<name>.old-<pid>-<hex>`` (the old output moved aside where no atomic swap exists). The pid says whether
# the process that made them is still running.
_SIBLING_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover_output(out_dir: str | os.PathLike) -> list[Path]:
    """Repair what a killed conversion (SIGKILL, power loss) left beside `out_dir`; called by every conversion
    before it writes.

    - `out_dir` is missing but an old output moved aside during an overwrite (``.<name>.old-<pid>-<hex>``)
      survives: it is renamed back to `out_dir`, so the user's previous output is never lost.
    - Temporary folders and files (``.<name>.tmp-<pid>-<hex>``) and old outputs that are no longer needed are
      removed.

    Only leftovers of processes that are no longer running are touched.

    Returns:
        The paths restored or removed.
    """
    out_dir = Path(out_dir)
    parent = out_dir.parent
    if not parent.is_dir():
        return []
    stale: list[Path] = []
    old: list[Path] = []
    for entry in parent.iterdir():
        match = _SIBLING_RE.match(entry.name)
        if match and match.group("name") == out_dir.name and not _pid_alive(int(match.group("pid"))):
            stale.append(entry)
            if match.group("kind") == "old" and entry.is_dir() and not entry.is_symlink():
                old.append(entry)
    handled: list[Path] = []
    old.sort(key=lambda p: p.stat().st_mtime)
    if old and not os.path.lexists(out_dir):
        # Killed between moving the old output aside and moving the new one in: put the old one back.
        os.rename(old[-1], out_dir)
        _fsync_dir(parent)
        logger.warning("restored %s from %s, left by an interrupted overwrite", out_dir, old[-1].name)
        handled.append(old[-1])
        stale.remove(old[-1])
    for entry in stale:
        _remove(entry)
        handled.append(entry)
    if stale:
        logger.info("removed %d leftover(s) of interrupted conversions beside %s", len(stale), out_dir)
    return handled


def clean_stale_temp_dirs(out_dir: str | os.PathLike) -> list[Path]:
    """Alias of :func:`recover_output` (the earlier name)."""
    return recover_output(out_dir)


def check_no_overlap(out_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    """The rule that keeps every conversion's output away from its inputs: OUT_DIR may not be, contain, or lie
    inside any input, compared after resolving symbolic links. Writing (and above all ``overwrite``) would
    otherwise modify or delete the inputs.

    Args:
        out_dir: the output folder (need not exist).
        inputs: input folders or files.

    Raises:
        ValueError: naming both paths and the fix.
    """
    out = Path(out_dir)
    out_real = out.resolve()
    for given in inputs:
        given = Path(given)
        real = given.resolve()
        if out_real == real:
            relation = "is the same folder as"
        elif real.is_relative_to(out_real):
            relation = "contains"
        elif out_real.is_relative_to(real):
            relation = "lies inside"
        else:
            continue
        shown = str(given) if given.absolute() == real else f"{given} (= {real})"
        folder = real if real.is_dir() or not real.exists() else real.parent
        raise ValueError(
            f"output folder {out} {relation} the input {shown}; writing there would modify or delete the input. "
            "Choose an OUT_DIR that is neither an input, inside one, nor a parent of one, e.g. "
            f"{folder.parent / (folder.name + '-out')}"
        )


def check_out_dir(
    out_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), *, overwrite: bool = False
) -> Path:
    """Checks every conversion runs on its output before any work: no overlap with the inputs
    (:func:`check_no_overlap`), leftovers of killed runs recovered (:func:`recover_output`), and an existing
    OUT_DIR only with `overwrite`.

    Returns:
        `out_dir` as a Path.

    Raises:
        ValueError: OUT_DIR overlaps an input.
        FileExistsError: OUT_DIR exists and `overwrite` is False, or it is not a folder, or (with `overwrite`) a
            symbolic link.
    """
    out_dir = Path(out_dir)
    check_no_overlap(out_dir, inputs)
    recover_output(out_dir)
    if os.path.lexists(out_dir):
        if not overwrite:
            raise FileExistsError(
                f"output folder {out_dir} already exists; choose another path or pass overwrite=True "
                "(CLI: --overwrite)"
            )
        if out_dir.is_symlink():
            raise FileExistsError(
                f"output folder {out_dir} is a symbolic link; pass the folder it points to, or remove the link"
            )
        if not out_dir.is_dir():
            raise FileExistsError(
                f"output path {out_dir} exists and is not a folder; remove it or choose another path"
            )
    return out_dir


def _fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # no directory handles on this platform
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root` to disk, so that a power loss after the rename keeps them."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2  # linux/fs.h


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """Linux renameat2(2): True if done; False where the system or file system lacks it, or (RENAME_NOREPLACE)
    `b` exists."""
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # musl / old glibc
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EEXIST):
        return False
    raise OSError(err, f"cannot move {a} to {b}: {os.strerror(err)}")


def _publish(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the complete folder `tmp` to `out_dir`. At every instant `out_dir` holds the old or the new output,
    or (two-rename fallback, killed between the renames) :func:`recover_output` restores the old one."""
    parent = out_dir.parent
    if not os.path.lexists(out_dir):
        if _renameat2(tmp, out_dir, _RENAME_NOREPLACE):
            _fsync_dir(parent)
            return
        if not os.path.lexists(out_dir):
            os.rename(tmp, out_dir)
            _fsync_dir(parent)
            return
    if not overwrite:  # created by someone else meanwhile
        raise FileExistsError(f"output folder {out_dir} appeared during the conversion; not replacing it")
    if _renameat2(tmp, out_dir, _RENAME_EXCHANGE):  # tmp now holds the old output, out_dir the new one
        _fsync_dir(parent)
        _remove(tmp)
        return
    old = _sibling(out_dir, "old")
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    _fsync_dir(parent)
    _remove(old)


class ConversionTerminated(SystemExit):
    """Raised in the main thread when SIGTERM arrives during a conversion, so that its temporary output is
    removed as on Ctrl-C; the process then exits with status 143 (128 + SIGTERM) unless the caller catches it."""


@contextmanager
def _sigterm_cleans_up() -> Iterator[None]:
    # Only where SIGTERM would otherwise kill the process outright (default handler, main thread): a handler the
    # application installed stays in charge.
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the clean-up
        raise ConversionTerminated(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def atomic_output_dir(
    out_dir: str | os.PathLike, *, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Yield a temporary folder beside `out_dir`; on success fsync it and move it to `out_dir`, on any failure
    (exception, Ctrl-C, SIGTERM) delete it.

    The temporary folder is named ``.<OUT_DIR name>.tmp-<pid>-<hex>``. With ``overwrite=True`` an existing
    `out_dir` is replaced only once the new one is complete, by an atomic swap where the file system has one
    (Linux) and otherwise by two renames that :func:`recover_output` completes if the process dies between them.
    After SIGKILL or a power loss the next call for the same `out_dir` restores or removes what was left.

    Args:
        out_dir: destination folder; its parent is created if needed.
        overwrite: replace an existing `out_dir` instead of raising.
        inputs: the conversion's input folders and files; `out_dir` may not overlap them
            (:func:`check_no_overlap`).

    Raises:
        FileExistsError: `out_dir` exists and `overwrite` is False.
        ValueError: `out_dir` overlaps an input.
    """
    inputs = list(inputs)
    out_dir = check_out_dir(out_dir, inputs, overwrite=overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out_dir, "tmp")
    with _sigterm_cleans_up():
        tmp.mkdir()
        try:
            yield tmp
            _fsync_tree(tmp)
            check_no_overlap(out_dir, inputs)  # a symbolic link may have been changed meanwhile
            _publish(tmp, out_dir, overwrite)
        except BaseException:
            _remove(tmp)
            raise


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a file for writing that appears at `path` only complete: the data goes to a hidden temporary file
    beside it, which is flushed to disk and renamed over `path` when the block ends without error (and deleted
    otherwise). The file gets the permissions ``open(path, "w")`` would give (0666 minus the umask).

    Args:
        path: the destination file; its folder must exist.
        mode: "w" (text) or "wb".
        encoding: text encoding for mode "w".
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    recover_output(path)  # temporary files of killed writers
    tmp = _sibling(path, "tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(fd, mode, encoding=encoding if mode == "w" else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: str | bytes, *, encoding: str = "utf-8") -> Path:
    """Write `data` (text or bytes) to `path` through :func:`atomic_open`.

    Returns:
        `path` as a Path.
    """
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w", encoding=encoding) as f:
        f.write(data)
    return Path(path)


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[Path]:
    """Copy the tokenizer files (tokenizer.json, tokenizer_config.json, special_tokens_map.json, vocab/merges,
    tokenizer.model, chat_template.*) and generation_config.json that exist in `src` into `dst`.

    Returns:
        The source files copied.
    """
    src, dst = Path(src), Path(dst)
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    names += sorted({p.name for pattern in TOKENIZER_GLOBS for p in src.glob(pattern) if p.is_file()})
    copied = []
    for name in names:
        shutil.copyfile(src / name, dst / name)
        copied.append(src / name)
    return copied


def package_versions(
    packages: Iterable[str] = ("hf-moe", "torch", "transformers", "safetensors"),
) -> dict[str, str]:
    versions = {}
    for package in packages:
        try:
            versions[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def write_provenance(
    out_dir: str | os.PathLike,
    *,
    source: str | os.PathLike | CheckpointReader,
    method: str,
    options: dict[str, Any],
    source_files: Iterable[str | os.PathLike] | None = None,
    checksums: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``hf_moe_provenance.json``: where the weights came from and how they were made.

    Args:
        out_dir: the output folder.
        source: the source folder, or its :class:`CheckpointReader` (then its config and the files it read are
            recorded).
        method: e.g. ``"upcycle"``.
        options: the conversion options (JSON-serialisable; others are stored with ``str``).
        source_files: files whose sha256 to record; default: the reader's files read, plus tokenizer files.
        checksums: sha256 already computed, keyed by path (``str(path)``); others are computed here.
        extra: more top-level entries.

    Returns:
        The path written.
    """
    reader = source if isinstance(source, CheckpointReader) else None
    root = reader.root if reader else Path(source)
    model_type = reader.model_type if reader else None
    if reader is None and (root / CONFIG_NAME).is_file():
        model_type = json.loads((root / CONFIG_NAME).read_text()).get("model_type")
    if source_files is None:
        source_files = list(reader.files_read) if reader else []
    files = {}
    for path in source_files:
        path = Path(path)
        key = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        files[key] = (checksums or {}).get(str(path)) or sha256_file(path)
    source_record: dict[str, Any] = {
        "path": str(root.resolve()),
        "model_type": model_type,
        "files_sha256": files,
    }
    source_record.update(hub_origin(root) or {})
    record = {
        "source": source_record,
        "method": method,
        "options": options,
        "versions": package_versions(),
        **(extra or {}),
    }
    out = Path(out_dir) / PROVENANCE_NAME
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return out


__all__ = [
    "PROVENANCE_NAME",
    "CheckpointReader",
    "ConversionTerminated",
    "ShardWriter",
    "StoredTensor",
    "atomic_open",
    "atomic_output_dir",
    "atomic_write",
    "check_floating_weights",
    "check_no_overlap",
    "check_out_dir",
    "clean_stale_temp_dirs",
    "copy_tokenizer_files",
    "index_entry_path",
    "parse_size",
    "read_safetensors_header",
    "recover_output",
    "sha256_file",
    "write_provenance",
]
