"""Model folders or Hub repo ids: every hf-moe command and API that reads a model accepts either.

:func:`resolve_model` turns ``"org/name"`` (optionally ``"org/name@revision"``) into a local snapshot folder with
``huggingface_hub.snapshot_download``, so the usual Hub settings apply: ``HF_HOME`` / ``HF_HUB_CACHE`` (where the
cache lives), ``HF_ENDPOINT``, ``HF_HUB_OFFLINE=1`` (use the cache, no requests) and tokens (``token=``,
``HF_TOKEN`` or ``hf auth login``). Only what hf-moe reads is downloaded: safetensors weights and their index,
``config.json``, ``generation_config.json``, tokenizer files and chat templates. Repos whose weights are pickles
only (``.bin`` / ``.pt`` / ``.pth``) are refused from the file listing, before any weight is fetched: loading a
pickle can run code, and hf-moe reads safetensors only.

A path that exists locally always wins over a repo id of the same spelling. Folders resolved from the Hub are
recognised later by their cache layout (:func:`hub_origin`), so provenance can name the repo and commit instead of
a cache path.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

# Files hf-moe reads from a model repo. Weights are safetensors only; READMEs, pickles, ONNX/GGUF exports,
# images and training logs are never fetched.
CONFIG_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "*.tiktoken",
    "chat_template.jinja",
    "chat_template.json",
    "hf_moe_provenance.json",
)
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# The Hub's rule for repo names: letters, digits, '-', '_', '.'; no leading/trailing '-' or '.', no '--' or '..'.
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
REPO_ID_RE = re.compile(rf"^(?P<repo>{_NAME}/{_NAME})(?:@(?P<revision>[^\s@]+))?$")


class HubModelError(FileNotFoundError):
    """A repo id that could not be resolved to a usable local snapshot (missing repo or revision, not cached
    while offline, unreachable Hub, no safetensors weights). A FileNotFoundError: the model cannot be found."""


def parse_repo_id(text: str) -> tuple[str, str | None] | None:
    """``"org/name"`` -> ("org/name", None); ``"org/name@rev"`` -> ("org/name", "rev"); anything else -> None."""
    match = REPO_ID_RE.match(text)
    if match is None or "--" in match["repo"] or ".." in match["repo"]:
        return None
    return match["repo"], match["revision"]


def _hub_settings() -> tuple[str, str, bool]:
    """(cache dir, endpoint, offline) read from the environment now, falling back to huggingface_hub's values
    (which it reads once at import, so settings made after import would otherwise be ignored)."""
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        cache = env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]
    elif env.get("HF_HOME"):
        cache = os.path.join(env["HF_HOME"], "hub")
    else:
        cache = constants.HF_HUB_CACHE
    endpoint = (env.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    flag = env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE")
    offline = constants.HF_HUB_OFFLINE if flag is None else flag.strip().upper() in {"1", "ON", "YES", "TRUE"}
    return os.path.expanduser(os.path.expandvars(cache)), endpoint, offline


def _pickle_only_message(repo_id: str, revision: str | None, pickles: list[str]) -> str:
    at = f" at revision {revision!r}" if revision else ""
    return (
        f"{repo_id}{at} has only pickle weights ({', '.join(pickles[:3])}{', ...' if len(pickles) > 3 else ''}) "
        "and no safetensors; hf-moe reads safetensors only (loading a pickle can run arbitrary code). Convert it "
        "once, in an environment you trust: `AutoModelForCausalLM.from_pretrained(REPO).save_pretrained(DIR)` "
        "writes safetensors, then pass DIR; or use a revision that has safetensors (the Hub's safetensors "
        "conversion bot opens them as refs/pr/N: --revision refs/pr/N)"
    )


def _check_weights(repo_id: str, revision: str | None, files: list[str], where: str) -> None:
    if any(f.endswith(".safetensors") for f in files):
        return
    pickles = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ValueError(_pickle_only_message(repo_id, revision, pickles))
    raise HubModelError(
        f"{repo_id}{f'@{revision}' if revision else ''} has no weights ({where} lists no "
        "*.safetensors files); is it a model repo?"
    )


def resolve_model(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    weights: bool = True,
) -> Path:
    """A local model folder for a path or a Hub repo id.

    Args:
        name_or_path: an existing local path (returned as is), or a Hub model repo id ``"org/name"``, optionally
            ``"org/name@revision"``.
        revision: branch, tag or commit sha for a repo id (default: the repo's default branch, "main").
        token: Hub token; None uses ``HF_TOKEN`` or the token saved by ``hf auth login``.
        weights: False fetches config and tokenizer files only (for commands that read shapes, not weights).

    Returns:
        The folder: `name_or_path` itself when it exists locally, else the snapshot folder in the Hub cache
        (``$HF_HOME/hub/models--org--name/snapshots/<sha>``).

    Raises:
        FileNotFoundError: neither an existing path nor a valid repo id (the message says which forms are
            accepted); :class:`HubModelError` (a FileNotFoundError) for a repo or revision the Hub does not have,
            a repo not in the cache while ``HF_HUB_OFFLINE=1``, an unreachable Hub, or a repo without weights.
        ValueError: a repo whose weights are pickles only (refused before any weight is downloaded), or two
            different revisions given (``@rev`` and `revision`).
    """
    path = Path(name_or_path)
    if path.exists():  # a local path always wins, even if it also reads as a repo id
        return path
    text = os.fspath(name_or_path)
    parsed = parse_repo_id(text)
    if parsed is None:
        raise FileNotFoundError(
            f"{text!r} does not exist, and is not a Hub repo id either; give a local model folder (config.json + "
            "safetensors), or a Hub model repo id as org/name (optionally org/name@revision)"
        )
    repo_id, inline_revision = parsed
    if inline_revision and revision and inline_revision != revision:
        raise ValueError(
            f"{text!r} names revision {inline_revision!r} but revision={revision!r} was also given; give one"
        )
    revision = inline_revision or revision
    return _download(repo_id, revision, token=token, weights=weights)


def _download(repo_id: str, revision: str | None, *, token: str | bool | None, weights: bool) -> Path:
    cache_dir, endpoint, offline = _hub_settings()
    label = f"{repo_id}@{revision}" if revision else repo_id
    patterns = [*CONFIG_PATTERNS, *(WEIGHT_PATTERNS if weights else ())]
    try:
        if not offline:
            # The file list first: a pickle-only repo is refused before any weight is requested.
            info = HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision)
            if weights:
                _check_weights(repo_id, revision, [s.rfilename for s in info.siblings or []], "the Hub")
        folder = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache_dir,
                endpoint=endpoint,
                token=token,
                allow_patterns=patterns,
                local_files_only=offline,
            )
        )
    except GatedRepoError as err:
        raise HubModelError(
            f"{repo_id} is gated: accept its terms on the Hub page, then log in (`hf auth login`) or set HF_TOKEN"
        ) from err
    except RevisionNotFoundError as err:
        raise HubModelError(
            f"{repo_id} has no revision {revision!r}; give a branch, tag or commit sha"
        ) from err
    except RepositoryNotFoundError as err:
        raise HubModelError(
            f"{label!r} is not a local folder, and the Hub ({endpoint}) has no model repo {repo_id} that this "
            "token can see; check the spelling, or log in (`hf auth login`, HF_TOKEN) for a private repo"
        ) from err
    except LocalEntryNotFoundError as err:
        if offline and type(err).__name__ == "IncompleteSnapshotError":
            raise HubModelError(
                f"the cached snapshot of {label} lacks files hf-moe needs (only its config may have been fetched) and "
                "HF_HUB_OFFLINE is set; download it once online, or unset HF_HUB_OFFLINE"
            ) from err
        if offline:
            raise HubModelError(
                f"{label} is not in the Hub cache ({cache_dir}) and HF_HUB_OFFLINE is set; download it once "
                "online, or unset HF_HUB_OFFLINE"
            ) from err
        raise HubModelError(f"could not download {label} from {endpoint}: {err}") from err
    except Exception as err:
        if isinstance(err, HubModelError) or not _is_connection_error(err):
            raise
        raise HubModelError(
            f"could not download {label} from {endpoint} ({type(err).__name__}: {str(err).splitlines()[0]}); "
            "check the connection, or set HF_HUB_OFFLINE=1 to use the cache"
        ) from err
    if not (folder / "config.json").is_file():
        raise HubModelError(f"{label} has no config.json; hf-moe needs a transformers model repo")
    if weights:  # offline the listing came from the cache: check what is there
        _check_weights(repo_id, revision, [p.name for p in folder.iterdir()], "the cached snapshot")
    return folder


def _is_connection_error(err: BaseException) -> bool:
    """An HTTP error of huggingface_hub, an OSError, or an error of its HTTP client: httpx with huggingface_hub 1.x,
    httpx2 with 2.x, matched by module name (neither is a dependency of hf-moe, and only one is installed)."""
    return isinstance(err, HfHubHTTPError | OSError) or any(
        cls.__module__.split(".")[0] in ("httpx", "httpx2") for cls in type(err).__mro__
    )


def hub_origin(folder: str | os.PathLike) -> dict[str, str] | None:
    """``{"repo_id": "org/name", "revision": "<commit sha>"}`` for a folder inside the Hub cache
    (``.../models--org--name/snapshots/<sha>``, as returned by :func:`resolve_model`), else None.

    Provenance records this instead of the cache path, which means nothing on another machine.
    """
    path = Path(folder)
    if path.parent.name != "snapshots" or not re.fullmatch(r"[0-9a-f]{40}", path.name):
        return None
    repo_dir = path.parent.parent.name
    if not repo_dir.startswith("models--"):
        return None
    org_name = repo_dir.removeprefix("models--").split("--")
    return {"repo_id": "/".join(org_name), "revision": path.name}


__all__ = [
    "CONFIG_PATTERNS",
    "PICKLE_SUFFIXES",
    "WEIGHT_PATTERNS",
    "HubModelError",
    "hub_origin",
    "parse_repo_id",
    "resolve_model",
]
