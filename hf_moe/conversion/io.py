"""Checkpoint I/O for conversions: read Hugging Face checkpoint folders lazily, write sharded safetensors as a
stream, and publish an output folder atomically.

- :class:`CheckpointReader` validates a source folder up front (config, index, every shard's safetensors header
  and size) so that a broken input fails before any output is written, then hands out one tensor at a time.
- :class:`ShardWriter` writes each tensor straight to disk as it is added (only the safetensors header is kept in
  memory), starts a new shard when the current one would pass ``max_shard_size``, and at the end renames the
  shards to ``model-0000x-of-0000n.safetensors`` and writes ``model.safetensors.index.json``.
- :func:`atomic_output_dir` builds the output in a temporary folder beside the destination and renames it into
  place only on success.

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

import hashlib
import json
import logging
import os
import re
import shutil
import struct
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

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
TOKENIZER_GLOBS = ("chat_template.*",)

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

    Checks that the header is well formed, that each tensor's byte range matches its dtype and shape, and that
    the file size equals header + data (a truncated or padded file is refused).

    Returns:
        The header dict: ``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a complete safetensors file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(
                f"{path} is not a safetensors file (only {size} bytes); re-download or re-save it"
            )
        (header_len,) = struct.unpack("<Q", head)
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise ValueError(
                f"{path} has a corrupt or truncated safetensors header (header length {header_len}, file size "
                f"{size}); re-download or re-save it"
            )
        try:
            header = json.loads(f.read(header_len).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(
                f"{path} has an unreadable safetensors header ({err}); re-download or re-save it"
            ) from err
    if not isinstance(header, dict):
        raise ValueError(f"{path} has a malformed safetensors header; re-download or re-save it")
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            numel = 1
            for dim in info["shape"]:
                numel *= int(dim)
            expected = numel * _ST_ITEMSIZE[info["dtype"]]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: malformed header entry for tensor {name!r} ({err!r})") from err
        if end - start != expected:
            raise ValueError(
                f"{path}: tensor {name!r} spans {end - start} bytes but its shape needs {expected}"
            )
        data_end = max(data_end, end)
    if size != 8 + header_len + data_end:
        raise ValueError(
            f"{path} is truncated or corrupt: its header describes {8 + header_len + data_end} bytes but the file "
            f"has {size}; re-download or re-save it"
        )
    return header


def _inside(root: Path, name: str) -> Path:
    """`root / name` if `name` is a plain relative path (no absolute path, no ``..``), else ValueError.

    Symbolic links inside the folder are followed wherever they point: the Hugging Face Hub cache stores every
    snapshot file as a link into ``../../blobs``, and the user chose that folder.
    """
    candidate = Path(name)
    if not name or candidate.is_absolute() or ".." in candidate.parts:
        raise ValueError(
            f"{root / SAFE_WEIGHTS_INDEX_NAME} names weights file {name!r} outside the checkpoint folder; an index "
            "may only name files inside its own folder"
        )
    return root / candidate


# ================================================================================================================
# Reading.
# ================================================================================================================


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
            self.config: dict[str, Any] = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_path} is not valid JSON ({err})") from err
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
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(
                    f"{index} is not a valid safetensors index (needs a 'weight_map'): {err!r}"
                ) from err
            self.files_read.append(index)
            for file_name in set(weight_map.values()):
                path = _inside(self.root, file_name)
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
            if handle is None:
                handle = self._handles[file_name] = safe_open(
                    str(self.root / file_name), framework="pt", device="cpu"
                )
            return handle.get_tensor(name)
        # Default: a plain read of the tensor's bytes (offsets from the header validated at open) into a fresh
        # tensor. Memory-mapped pages of a multi-GB shard would stay resident and count towards the process's
        # memory until the map is closed; read() keeps the peak at the tensors actually held.
        if handle is None:
            handle = self._handles[file_name] = open(self.root / file_name, "rb")  # noqa: SIM115 (closed in close())
        info = self._headers[file_name][name]
        start, end = info["data_offsets"]
        data_start = self._data_start.get(file_name)
        if data_start is None:
            handle.seek(0)
            data_start = self._data_start[file_name] = 8 + struct.unpack("<Q", handle.read(8))[0]
        buffer = torch.empty(end - start, dtype=torch.uint8)
        if end > start:
            handle.seek(data_start + start)
            if handle.readinto(memoryview(buffer.numpy())) != end - start:
                raise ValueError(
                    f"{self.root / file_name} ended early while reading {name!r}; was it modified?"
                )
        return buffer.view(self.dtype(name)).reshape(info["shape"])

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


# ================================================================================================================
# Writing.
# ================================================================================================================


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
        self._file = open(path, "wb")
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

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write `tensor` under `name` (CPU copy, contiguous). Names must be unique.

        Raises:
            ValueError: a duplicate name or an unsupported dtype.
        """
        self.add_stacked(name, [tensor], stack=False)

    def add_stacked(self, name: str, parts: list[torch.Tensor], *, stack: bool = True) -> None:
        """Write ``torch.stack(parts)`` under `name` without building the stacked tensor: each part's bytes are
        written in turn, so repeated parts (e.g. identical experts) cost no memory.

        Args:
            name: tensor name.
            parts: tensors of one shape and dtype (the same object may repeat).
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
        if any(p.shape != first.shape or p.dtype != first.dtype for p in parts):
            raise ValueError(f"tensor {name!r}: the parts to stack differ in shape or dtype")
        if first.dtype not in _DTYPE_TO_ST:
            raise ValueError(f"tensor {name!r} has dtype {first.dtype}, which safetensors cannot store")
        shape = [len(parts), *first.shape] if stack else list(first.shape)
        nbytes = first.numel() * first.element_size() * len(parts)
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
            contiguous = {}
            for part in parts:
                key = id(part)
                if key not in contiguous:
                    contiguous[key] = part.detach().to("cpu").contiguous()
                # A uint8 view writes the raw bytes of any dtype (bfloat16 included) without a copy.
                self._file.write(memoryview(contiguous[key].reshape(-1).view(torch.uint8).numpy()))
        shard["header"][name] = {
            "dtype": _DTYPE_TO_ST[first.dtype],
            "shape": shape,
            "data_offsets": [start, start + nbytes],
        }
        shard["size"] += nbytes
        self.total_size += nbytes
        self._names.add(name)

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

_TMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]+$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temp_dirs(out_dir: str | os.PathLike) -> list[Path]:
    """Remove temporary folders ``.<name>.tmp-<pid>-<hex>`` beside `out_dir` left by killed conversions (their
    process id is no longer running).

    Returns:
        The folders removed.
    """
    out_dir = Path(out_dir)
    removed = []
    parent = out_dir.parent
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        match = _TMP_RE.match(entry.name)
        if (
            match
            and match.group("name") == out_dir.name
            and entry.is_dir()
            and not _pid_alive(int(match.group("pid")))
        ):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


@contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out_dir`; on success rename it to `out_dir`, on any failure (exception,
    KeyboardInterrupt) delete it.

    The temporary folder is named ``.<OUT_DIR name>.tmp-<pid>-<hex>``; if the process is killed (SIGKILL) it can
    be left behind, and the next call for the same `out_dir` removes it. With ``overwrite=True`` an existing
    `out_dir` is replaced only after the new one is complete.

    Args:
        out_dir: destination folder; its parent is created if needed.
        overwrite: replace an existing `out_dir` instead of raising.

    Raises:
        FileExistsError: `out_dir` exists and `overwrite` is False.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(
            f"output folder {out_dir} already exists; choose another path or pass overwrite=True"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(
            f"output path {out_dir} exists and is not a folder; remove it or choose another path"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temp_dirs(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out_dir.exists():
            if not overwrite:  # created by someone else meanwhile
                raise FileExistsError(
                    f"output folder {out_dir} appeared during the conversion; not replacing it"
                )
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    record = {
        "source": {"path": str(root.resolve()), "model_type": model_type, "files_sha256": files},
        "method": method,
        "options": options,
        "versions": package_versions(),
        **(extra or {}),
    }
    out = Path(out_dir) / PROVENANCE_NAME
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return out


__all__ = [
    "CheckpointReader",
    "ShardWriter",
    "atomic_output_dir",
    "clean_stale_temp_dirs",
    "copy_tokenizer_files",
    "parse_size",
    "read_safetensors_header",
    "sha256_file",
    "write_provenance",
    "PROVENANCE_NAME",
]
