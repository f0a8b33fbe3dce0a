"""Checkpoint I/O: reading HF folders (single / sharded), validation errors, the streaming shard writer, atomic
output folders, tokenizer copy and provenance."""

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hf_moe.conversion import io as hf_io
from hf_moe.conversion.io import (
    PROVENANCE_NAME,
    CheckpointReader,
    ShardWriter,
    atomic_open,
    atomic_output_dir,
    atomic_write,
    check_out_dir,
    copy_tokenizer_files,
    parse_size,
    read_safetensors_header,
    recover_output,
    sha256_file,
    write_provenance,
)
from tests.helpers.dense import make_dense_llama


def _tiny_llama_dir(path: Path, *, max_shard_size: str | None = None) -> Path:
    """A tiny Llama as transformers initialises it, without a tokenizer."""
    make_dense_llama(path, randomised=False, tokenizer=False, max_shard_size=max_shard_size)
    return path


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory) -> Path:
    return _tiny_llama_dir(tmp_path_factory.mktemp("sharded") / "dense", max_shard_size="20KB")


@pytest.fixture(scope="module")
def single_dir(tmp_path_factory) -> Path:
    return _tiny_llama_dir(tmp_path_factory.mktemp("single") / "dense")


def _expected_state(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("which", ["single", "sharded"])
def test_reader_reads_every_tensor(which, mmap, single_dir, sharded_dir):
    path = single_dir if which == "single" else sharded_dir
    if which == "sharded":
        assert (path / "model.safetensors.index.json").is_file()
        assert len(list(path.glob("model-*-of-*.safetensors"))) > 2
    expected = _expected_state(path)
    with CheckpointReader(path, mmap=mmap) as reader:
        assert reader.model_type == "llama"
        assert set(reader.keys()) == set(expected)
        for name, tensor in expected.items():
            assert reader.shape(name) == tuple(tensor.shape)
            assert reader.dtype(name) == tensor.dtype
            assert torch.equal(reader.get_tensor(name), tensor)
        with pytest.raises(KeyError, match="not in the checkpoint"):
            reader.get_tensor("nope")


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_config(tmp_path, single_dir):
    path = _copy(single_dir, tmp_path / "c")
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        CheckpointReader(path)


def test_missing_shard(tmp_path, sharded_dir):
    path = _copy(sharded_dir, tmp_path / "c")
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        CheckpointReader(path)


def test_truncated_shard(tmp_path, sharded_dir):
    path = _copy(sharded_dir, tmp_path / "c")
    victim = sorted(path.glob("model-*.safetensors"))[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated"):
        CheckpointReader(path)
    victim.write_bytes(data[:5])
    with pytest.raises(ValueError, match="not a safetensors file"):
        CheckpointReader(path)


@pytest.mark.parametrize("bad_name", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_outside_folder(tmp_path, sharded_dir, bad_name):
    path = _copy(sharded_dir, tmp_path / "c")
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = bad_name
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="outside"):
        CheckpointReader(path)


def test_index_names_tensor_absent_from_shard(tmp_path, sharded_dir):
    path = _copy(sharded_dir, tmp_path / "c")
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.ghost.weight"] = next(iter(index["weight_map"].values()))
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="model.ghost.weight"):
        CheckpointReader(path)


def test_pickle_only_refused_with_conversion_hint(tmp_path, single_dir):
    path = tmp_path / "pickled"
    path.mkdir()
    (path / "config.json").write_text((single_dir / "config.json").read_text())
    torch.save({"w": torch.zeros(2)}, path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pickle.*save_pretrained"):
        CheckpointReader(path)


def test_no_weights_at_all(tmp_path, single_dir):
    path = tmp_path / "empty"
    path.mkdir()
    (path / "config.json").write_text((single_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights"):
        CheckpointReader(path)


def test_reader_does_not_modify_inputs(single_dir, sharded_dir):
    for path in (single_dir, sharded_dir):
        before = {p.name: (p.stat().st_mtime_ns, sha256_file(p)) for p in path.iterdir()}
        with CheckpointReader(path) as reader:
            for name in reader.keys():
                reader.get_tensor(name)
        assert {p.name: (p.stat().st_mtime_ns, sha256_file(p)) for p in path.iterdir()} == before


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1GiB") == 2**30
    assert parse_size("10KiB") == 10240
    assert parse_size(1234) == 1234
    with pytest.raises(ValueError, match="cannot parse size"):
        parse_size("big")


def test_shard_writer_sharded_roundtrip(tmp_path):
    torch.manual_seed(0)
    tensors = {
        f"t{i}": torch.randn(10, 10 + i).to(dtype)
        for i, dtype in enumerate([torch.float32, torch.bfloat16, torch.float16, torch.float32] * 3)
    }
    tensors["ints"] = torch.arange(7, dtype=torch.int64)
    tensors["empty"] = torch.zeros(0, 3)
    tensors["strided"] = torch.randn(8, 6).t()  # non-contiguous input
    with ShardWriter(tmp_path, max_shard_size=1000) as writer:
        for name, t in tensors.items():
            writer.add(name, t)
    files = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    n = len(files)
    assert n > 3
    assert [f.name for f in files] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not list(tmp_path.glob(".*partial"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for f in files:
        read_safetensors_header(f)  # size check passes
        header_len = struct.unpack("<Q", f.read_bytes()[:8])[0]
        assert header_len % 8 == 0
    for name, t in tensors.items():
        with safe_open(str(tmp_path / index["weight_map"][name]), framework="pt") as handle:
            got = handle.get_tensor(name)
        assert got.dtype == t.dtype and torch.equal(got, t), name
    # each shard respects the limit unless it holds a single oversized tensor
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            keys = list(handle.keys())
            size = sum(handle.get_tensor(k).numel() * handle.get_tensor(k).element_size() for k in keys)
        assert size <= 1000 or len(keys) == 1
    # our reader (index + shards) reads it back too
    with _reader_for(tmp_path) as reader:
        assert all(torch.equal(reader.get_tensor(name), t) for name, t in tensors.items())


def test_shard_writer_single_file_and_header_reserve(tmp_path):
    with ShardWriter(tmp_path, max_shard_size="1GB", header_reserve=400) as writer:
        for i in range(12):  # ~90 header bytes each: the 400-byte reserve forces new shards
            writer.add(f"layer.{i}.weight", torch.full((3,), float(i)))
    files = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(files) > 1
    loaded = {}
    for f in files:
        loaded.update(load_file(f))
    assert all(torch.equal(loaded[f"layer.{i}.weight"], torch.full((3,), float(i))) for i in range(12))

    single = tmp_path / "single"
    single.mkdir()
    with ShardWriter(single) as writer:
        writer.add("a", torch.ones(2, 2))
        with pytest.raises(ValueError, match="already written"):
            writer.add("a", torch.ones(2, 2))
    assert sorted(p.name for p in single.iterdir()) == ["model.safetensors"]
    assert torch.equal(load_file(single / "model.safetensors")["a"], torch.ones(2, 2))


def test_shard_writer_abort_removes_partials(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, max_shard_size=100) as writer:
            writer.add("a", torch.ones(40))
            writer.add("b", torch.ones(40))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def _reader_for(path: Path) -> CheckpointReader:
    (path / "config.json").write_text("{}")
    return CheckpointReader(path)


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_atomic_output_dir_success_failure_and_overwrite(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
        assert not out.exists()
        (tmp / "a.txt").write_text("one")
    assert (out / "a.txt").read_text() == "one"
    assert _siblings(out) == ["out"]

    with pytest.raises(FileExistsError, match="overwrite"):
        with atomic_output_dir(out):
            pass

    # a failure with overwrite keeps the old folder untouched and leaves no temp folder
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with atomic_output_dir(out, overwrite=True) as tmp:
                (tmp / "a.txt").write_text("two")
                raise exc
        assert (out / "a.txt").read_text() == "one"
        assert _siblings(out) == ["out"]

    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert _siblings(out) == ["out"]


def test_atomic_output_dir_failure_writes_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError):
        with atomic_output_dir(out) as tmp:
            (tmp / "x").write_text("x")
            raise ValueError("bad input")
    assert list(tmp_path.iterdir()) == []


def test_stale_temp_dir_of_dead_process_is_cleaned(tmp_path):
    out = tmp_path / "out"
    # pid 2**22 + 1 is above the default pid_max, so no process has it
    stale = tmp_path / f".out.tmp-{2**22 + 1}-deadbeef"
    stale.mkdir()
    (stale / "partial").write_text("x")
    alive = tmp_path / f".out.tmp-{os.getpid()}-cafebabe"  # a live conversion: must be left alone
    alive.mkdir()
    with atomic_output_dir(out) as tmp:
        (tmp / "ok").write_text("ok")
    assert not stale.exists()
    assert alive.exists()


def test_copy_tokenizer_files(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "merges.txt",
        "vocab.json",
        "tokenizer.model",
        "chat_template.jinja",
        "generation_config.json",
        "model.safetensors",
        "config.json",
        "README.md",
    ]:
        (src / name).write_text(name)
    copied = copy_tokenizer_files(src, dst)
    assert sorted(p.name for p in dst.iterdir()) == sorted(
        [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "merges.txt",
            "vocab.json",
            "tokenizer.model",
            "chat_template.jinja",
            "generation_config.json",
        ]
    )
    assert all((dst / p.name).read_text() == p.name for p in copied)


def test_write_provenance(tmp_path, sharded_dir):
    with CheckpointReader(sharded_dir) as reader:
        for name in reader.keys():
            reader.get_tensor(name)
        path = write_provenance(tmp_path, source=reader, method="upcycle", options={"num_experts": 4})
    record = json.loads(path.read_text())
    assert path.name == PROVENANCE_NAME
    assert record["method"] == "upcycle" and record["options"] == {"num_experts": 4}
    assert record["source"]["model_type"] == "llama"
    assert record["source"]["path"] == str(sharded_dir.resolve())
    files = record["source"]["files_sha256"]
    expected = {"config.json", "model.safetensors.index.json"} | {p.name for p in sharded_dir.glob("model-*")}
    assert set(files) == expected
    assert all(files[name] == sha256_file(sharded_dir / name) for name in files)
    assert set(record["versions"]) == {"hf-moe", "torch", "transformers", "safetensors"}
    assert record["versions"]["torch"] == torch.__version__.split("+")[0] or record["versions"][
        "torch"
    ].startswith(torch.__version__.split("+")[0])


def test_shard_writer_add_stacked_equals_stack(tmp_path):
    torch.manual_seed(0)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    parts = [a, b, a, a[:, :].t().t(), b]
    with ShardWriter(tmp_path, max_shard_size=1000) as writer:
        writer.add("before", torch.ones(5))
        writer.add_stacked("stacked", parts)
        writer.add_stacked("bf16", [a.bfloat16()] * 3)
        with pytest.raises(ValueError, match="differ"):
            writer.add_stacked("bad", [a, torch.randn(4, 3)])
    with _reader_for(tmp_path) as reader:
        assert torch.equal(reader.get_tensor("stacked"), torch.stack(parts))
        assert torch.equal(reader.get_tensor("bf16"), torch.stack([a.bfloat16()] * 3))
        assert torch.equal(reader.get_tensor("before"), torch.ones(5))


def test_shard_writer_repeated_views_are_copied_within_the_shard(tmp_path):
    """Experts that repeat a slice arrive as fresh view objects of the same memory (``w[j]``); the writer writes
    each distinct slice once and copies the repeats inside the file, and the result equals ``torch.stack``."""
    torch.manual_seed(0)
    w = torch.randn(2, 6, 5)  # (g, rows, cols): two distinct slices
    parts = [w[j % 2] for j in range(6)]  # six new view objects, two distinct memories
    strided = [w[0].t(), w[0].t(), w[1].t()]  # non-contiguous views repeat too
    with ShardWriter(tmp_path, max_shard_size="1MB") as writer:
        writer.add("lead", torch.arange(7.0))
        writer.add_stacked("experts", parts)
        writer.add_stacked("strided", strided)
    with _reader_for(tmp_path) as reader:
        assert torch.equal(reader.get_tensor("experts"), torch.stack(parts))
        assert torch.equal(reader.get_tensor("strided"), torch.stack(strided))
        assert torch.equal(reader.get_tensor("lead"), torch.arange(7.0))


def test_stored_tensors_are_copied_file_to_file(tmp_path, sharded_dir):
    """`CheckpointReader.stored` hands the writer a file range; every tensor of a sharded source copied that way
    (alone and stacked with itself and tensors) reads back equal, and nothing is loaded to do it."""
    expected = _expected_state(sharded_dir)
    out = tmp_path / "out"
    out.mkdir()
    with CheckpointReader(sharded_dir) as reader, ShardWriter(out, max_shard_size="30KB") as writer:
        for name in reader.keys():
            stored = reader.stored(name)
            assert (stored.shape, stored.dtype, stored.nbytes) == (
                reader.shape(name),
                reader.dtype(name),
                reader.nbytes(name),
            )
            writer.add(name, stored)
        assert not reader._handles  # stored() kept no shard open: nothing was read through the reader
        name = "model.layers.0.mlp.down_proj.weight"
        writer.add_stacked("stacked", [reader.stored(name), reader.get_tensor(name), reader.stored(name)])
    with _reader_for(out) as written:
        assert set(written.keys()) == set(expected) | {"stacked"}
        for key, tensor in expected.items():
            assert torch.equal(written.get_tensor(key), tensor), key
        assert torch.equal(written.get_tensor("stacked"), torch.stack([expected[name]] * 3))


def test_stored_tensor_from_another_file_system(tmp_path, sharded_dir):
    """A source on another file system (tmpfs here): the kernel may refuse a cross-device copy_file_range
    (EXDEV), and the writer then copies through a bounded buffer; either way the bytes arrive."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK) or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs a writable /dev/shm on another file system than the temporary folder")
    import shutil
    import tempfile

    src = Path(tempfile.mkdtemp(dir=shm))
    try:
        for f in sharded_dir.iterdir():
            shutil.copy(f, src / f.name)
        expected = _expected_state(sharded_dir)
        with CheckpointReader(src) as reader, ShardWriter(tmp_path, max_shard_size="1MB") as writer:
            for name in reader.keys():
                writer.add(name, reader.stored(name))
        with _reader_for(tmp_path) as written:
            for key, tensor in expected.items():
                assert torch.equal(written.get_tensor(key), tensor), key
    finally:
        shutil.rmtree(src, ignore_errors=True)


def test_stored_tensor_of_a_truncated_source_fails_clearly(tmp_path, single_dir):
    """A source shard cut short after it was validated: the copy stops with an error naming the file, and the
    writer (as a context manager) deletes its partial shard."""
    src = tmp_path / "src"
    src.mkdir()
    for f in single_dir.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "out"
    out.mkdir()
    with CheckpointReader(src) as reader:
        last = max(reader.keys(), key=lambda n: reader.stored(n).offset)
        stored = reader.stored(last)
        with open(src / "model.safetensors", "r+b") as f:
            f.truncate(stored.offset + stored.nbytes // 2)
        with pytest.raises(ValueError, match=r"model\.safetensors ended .* early .*modified"):
            with ShardWriter(out) as writer:
                writer.add(last, stored)
    assert list(out.iterdir()) == []


def test_hub_cache_style_symlinked_shards_are_read(tmp_path, sharded_dir):
    """A Hub cache snapshot links every file into ../../blobs; such a folder is a valid source."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for f in sharded_dir.iterdir():
        (blobs / f.name).write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", f.name))
    expected = _expected_state(sharded_dir)
    with CheckpointReader(snapshot) as reader:
        assert all(torch.equal(reader.get_tensor(name), t) for name, t in expected.items())


DEAD_PID = 2**22 + 1  # above the default pid_max: no process has it


def test_recovery_after_a_kill_between_the_two_renames(tmp_path):
    """The two-rename overwrite killed after moving the old output aside: the next run puts it back."""
    out = tmp_path / "out"
    old = tmp_path / f".out.old-{DEAD_PID}-0123abcd"
    old.mkdir()
    (old / "weights").write_text("old")
    new = tmp_path / f".out.tmp-{DEAD_PID}-4567cdef"  # the complete new output that never got renamed
    new.mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):  # restored first, so it is there to refuse
        check_out_dir(out)
    assert (out / "weights").read_text() == "old" and _siblings(out) == ["out"]
    # killed after the second rename: the new output is in place, the old one is removed
    old.mkdir()
    assert (
        recover_output(out) == [old] and (out / "weights").read_text() == "old" and _siblings(out) == ["out"]
    )


@pytest.mark.parametrize("swap", [True, False])
def test_overwrite_without_atomic_swap(tmp_path, monkeypatch, swap):
    """Where renameat2 is missing (not Linux, or a file system without RENAME_EXCHANGE) the two-rename path is
    used; a failure of the second rename puts the old output back."""
    if not swap:
        monkeypatch.setattr(hf_io, "_renameat2", lambda a, b, flags: False)
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "a").write_text("old")
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "a").write_text("new")
    assert (out / "a").read_text() == "new" and _siblings(out) == ["out"]
    if not swap:
        real_rename = os.rename

        def failing_second_rename(a, b):
            if ".tmp-" in str(a):
                raise OSError("disk gone")
            return real_rename(a, b)

        monkeypatch.setattr(hf_io.os, "rename", failing_second_rename)
        with pytest.raises(OSError, match="disk gone"):
            with atomic_output_dir(out, overwrite=True) as tmp:
                (tmp / "a").write_text("newer")
        assert (out / "a").read_text() == "new" and _siblings(out) == ["out"]


def test_overwrite_refuses_a_symlinked_out_dir(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(FileExistsError, match="symbolic link"):
        with atomic_output_dir(tmp_path / "link", overwrite=True):
            pass
    assert (tmp_path / "link").is_symlink()


def test_atomic_write_and_open(tmp_path):
    path = tmp_path / "card.md"
    atomic_write(path, "first")
    # Permissions as open() gives them (0666 minus the umask), without the library touching the umask.
    probe = tmp_path / "probe"
    probe.write_text("x")
    assert path.stat().st_mode & 0o777 == probe.stat().st_mode & 0o777
    atomic_write(path, b"\x00bytes")
    assert path.read_bytes() == b"\x00bytes"
    with pytest.raises(RuntimeError):
        with atomic_open(path, "w") as f:
            f.write("half")
            raise RuntimeError("interrupted")
    assert path.read_bytes() == b"\x00bytes"
    stale = tmp_path / f".card.md.tmp-{DEAD_PID}-89abcdef"  # a killed writer's temporary file
    stale.write_text("x")
    atomic_write(path, "again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card.md", "probe"]
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(path, "a"):
            pass


def test_header_reader_refuses_what_safetensors_refuses(tmp_path):
    """Holes or overlaps between tensors, negative or non-integer dims, non-string metadata: refused with the path
    (the library would refuse them later, without one)."""
    import json as _json

    def write(header: dict, data: bytes) -> Path:
        raw = _json.dumps(header).encode()
        path = tmp_path / "x.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
        return path

    a = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    cases = [
        ({"a": a, "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}}, 16, "starts at byte 12"),
        ({"a": a, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8, "starts at byte 4"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, "non-negative"),
        ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, 8, "non-negative"),
        ({"a": a, "__metadata__": {"format": 1}}, 8, "__metadata__"),
        ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, 8, "malformed header entry"),
    ]
    for header, size, fragment in cases:
        path = write(header, b"\0" * size)
        with pytest.raises(ValueError, match=fragment) as info:
            read_safetensors_header(path)
        assert str(path) in str(info.value)
