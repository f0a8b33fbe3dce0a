"""The real models that benchmarks/generate.py and benchmarks/train_step.py compare, built once and cached.

SmolLM2-135M-Instruct (examples/offline_assets.py: dequantized from the GGUF on PyPI), fp32, upcycled two ways:
- `equal-active`: 8 experts of half width (granularity 2), top-2: each token runs experts adding up to one dense MLP,
  the dense model's active parameters, and the model starts exact;
- `copy`: 4 full-width copies of the dense MLP, top-2: twice the dense MLP per token.
Both use the `topk_softmax` router (Mixtral's), so `hf_moe.export(..., to="mixtral")` writes transformers'
`MixtralForCausalLM` holding the same weights. Folders live in the hf_moe asset cache (`~/.cache/hf_moe/bench`).
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1] / "examples")
)  # offline_assets lives beside the examples

UPCYCLES = {
    "equal-active": dict(num_experts=8, top_k=2, granularity=2),
    "copy": dict(num_experts=4, top_k=2, granularity=1),
}


def model_dirs(kind: str) -> dict[str, Path]:
    """{"dense", "mixtral", "hf_moe"} -> checkpoint folder for the `kind` upcycle (built on first use)."""
    from offline_assets import cache_dir, smollm2_dense_dir

    from hf_moe import export
    from hf_moe.conversion.upcycle import upcycle

    dense = smollm2_dense_dir()
    root = cache_dir() / "bench" / f"smollm2-{kind}"
    moe, mixtral = root / "hf_moe", root / "mixtral"
    if not (moe / "config.json").is_file():
        upcycle(dense, moe, router_type="topk_softmax", overwrite=True, progress=False, **UPCYCLES[kind])
    if not (mixtral / "config.json").is_file():
        export(moe, mixtral, to="mixtral", overwrite=True)
    return {"dense": dense, "mixtral": mixtral, "hf_moe": moe}


def load(path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    import hf_moe  # noqa: F401  registers the hf_moe architecture with the Auto classes

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def env_prefix() -> str:
    """The glibc malloc settings (``MALLOC_*``) and hf_moe's kernel settings (``HF_MOE_*`` but the kernel cache's
    path) this process started with, as a command prefix; empty when none.

    ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000`` keeps freed memory in the process. On a VM that hands
    freed memory back to the hypervisor, a step that frees and re-allocates its large tensors (gradients, optimizer
    temporaries, logits) otherwise pays a hypervisor fault per page every step (BENCHMARKS.md, training step).
    ``HF_MOE_KERNEL_MARCH`` or ``HF_MOE_CPU_*`` change which kernels run, so a table's command must show them."""
    return "".join(
        f"{k}={v} "
        for k, v in sorted(os.environ.items())
        if k.startswith("MALLOC_") or (k.startswith("HF_MOE_") and k != "HF_MOE_KERNEL_CACHE")
    )


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that reproduces this run, for a table's caption: the malloc settings, the script and its
    arguments (`argv`, or the process's own when None)."""
    args = argv if argv is not None else sys.argv[1:]
    return (env_prefix() + f"python benchmarks/{script} " + " ".join(args)).strip()


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def vector_isa() -> str:
    """The widest x86 vector extension the CPU reports ("AVX-512", "AVX2"), which decides how the fused kernel is
    built and where it is used (BENCHMARKS.md, "AVX2 hosts"); "" where /proc/cpuinfo says neither."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
    except OSError:
        pass
    return ""


def kernel_build() -> str:
    """The caption's note on the kernel build when `HF_MOE_KERNEL_MARCH` sets a level other than the CPU's own (an
    AVX2 build timed on an AVX-512 machine): ", fused kernel built for -march=<level> (<ISA>)"; empty by default."""
    from hf_moe.modeling import cpu_kernel

    try:
        march = cpu_kernel.kernel_march()
    except ValueError:
        return ""
    if march == "native":
        return ""
    return f", fused kernel built for -march={march} ({'AVX-512' if cpu_kernel.has_avx512() else 'AVX2'})"


def last_level_cache_bytes() -> int | None:
    """The largest CPU cache this machine reports (Linux sysfs), in bytes; None where it is not reported."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * scale)
        except ValueError:
            continue
    return max(sizes) if sizes else None


def eviction_bytes() -> int:
    """Twice the last-level cache, at least 64 MB: VMs report caches from 32 MB to 300+ MB, so a fixed size would
    evict on one machine and not on the next."""
    return max(64 << 20, 2 * (last_level_cache_bytes() or 0))


def eviction_buffer() -> torch.Tensor:
    """A float32 buffer of `eviction_bytes()`: writing it before a timed call leaves the weights of the call in
    memory, not in the cache, as they are for each layer of a real model."""
    return torch.empty(eviction_bytes() // 4, dtype=torch.float32)


def machine_line(threads: int) -> str:
    import transformers

    return (
        f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}; "
        f"{platform.machine()} CPU, {cpu_model()}{f' with {isa}' if (isa := vector_isa()) else ''}{kernel_build()} "
        f"({os.cpu_count()} cores, shared with other jobs), "
        f"`torch.set_num_threads({threads})`"
    )


def write_section(path: Path, name: str, body: str, script: str | None = None) -> None:
    """Replace the section between `<!-- name:begin -->` and `<!-- name:end -->` (appended after the anchor
    `<!-- name: written by benchmarks/<script>.py -->`, or at the end of the file the first time), atomically."""
    import tempfile

    anchor = f"<!-- {name}: written by benchmarks/{script or name}.py -->"
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text()
    section = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    elif anchor in text:
        text = text.replace(anchor, f"{anchor}\n{section}", 1)
    else:
        text = text.rstrip("\n") + f"\n\n{anchor}\n{section}\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def text_batch(batch: int, seq_len: int, split: str = "heldout") -> torch.Tensor:
    """(batch, seq_len) token ids: consecutive windows of real Shakespeare text (examples/offline_assets.py),
    tokenized with SmolLM2's tokenizer; equal lengths, so no padding."""
    from offline_assets import shakespeare_texts, smollm2_dense_dir
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dense_dir())
    text = "\n\n".join(shakespeare_texts(split=split).values())[: 40 * batch * seq_len]
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < batch * seq_len:
        raise ValueError(f"not enough text for {batch}x{seq_len} tokens")
    return ids[: batch * seq_len].view(batch, seq_len).clone()


def load_line() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f} (1 min) / {five:.1f} (5 min)"
