"""Models named by Hugging Face Hub id (``owner/name`` or ``owner/name@revision``).

A model reference that is not an existing local path but reads as a Hub id is resolved with
``huggingface_hub`` (the ``hub`` extra), never by a re-implementation of its cache:

1. **Cache first.** ``snapshot_download(..., local_files_only=True)`` finds the snapshot of the
   revision (a branch or tag through the cache's ``refs/``); if it holds the weights (every
   shard of the index, or ``model.safetensors``, or a single ``*.safetensors``), it is used
   without any network access.
2. **Download** otherwise, unless ``HF_HUB_OFFLINE`` is set: first the index and the files
   soupkit carries to the output (`CARRY_FILES`: config, tokenizer), then exactly the weight
   files (the shards the index names, else ``model.safetensors``, else the top-level
   ``*.safetensors``). Pickles (``*.bin``), other formats and extra copies of the weights
   (e.g. ``consolidated.safetensors`` beside the shards) are never fetched. ``HF_ENDPOINT``,
   ``HF_HOME`` / ``HF_HUB_CACHE`` and ``HF_TOKEN`` are honoured as ``huggingface_hub`` reads them.

The snapshot folder is then opened like any folder (its files are links into the cache's
``blobs/``, followed by the rule of `soupkit.io.links`). `HubSource` records the resolved commit
and the Hub's ETag of every file used, for ``soupkit-report.json``.

A string that exists as a local path is always the local path, even if it also reads as a Hub
id (``org/model`` beside the recipe); write ``./org/model`` to make that plain to readers.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soupkit._util.extras import require
from soupkit.errors import CheckpointFormatError, SoupError
from soupkit.io.folder import CARRY_FILES, INDEX_NAME, SINGLE_NAME, read_index
from soupkit.io.links import resolve_model_file

__all__ = ["HubSource", "parse_hub_ref", "resolve_hub_model"]

_REF = re.compile(
    r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*)(?:@(?P<rev>[A-Za-z0-9][\w./-]*))?$"
)
_NOT_A_MODEL = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".json", ".yaml", ".yml")


def parse_hub_ref(text: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` for a reference that reads as a Hub id, else None.

    ``"org/name"`` -> ``("org/name", None)``; ``"org/name@v1.0"`` -> ``("org/name", "v1.0")``;
    ``"./org/name"``, ``"/abs/path"``, ``"name"``, ``"org/name/sub"``, ``"org/w.safetensors"``,
    ``"org/../x"`` -> None.
    """
    m = _REF.match(text.strip())
    if m is None or ".." in text:
        return None
    repo = m.group("repo")
    if repo.endswith(_NOT_A_MODEL) or repo.split("/")[0] in (".", ".."):
        return None
    return repo, m.group("rev")


@dataclass(frozen=True)
class HubSource:
    """Where a model named by Hub id came from.

    Attributes:
        repo_id: ``owner/name``.
        revision: the revision as written (None: the default branch).
        commit: the commit the revision resolved to (the snapshot folder's name).
        snapshot: the snapshot folder in the cache.
        downloaded: whether files were fetched in this run (False: all from the cache).
        etags: file name -> the Hub's ETag of that file (the name of its blob in the cache):
            the sha256 of the content for files stored with LFS / Xet (weights), the git
            blob id for small text files.
    """

    repo_id: str
    revision: str | None
    commit: str
    snapshot: Path
    downloaded: bool
    etags: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The report entry (``soupkit-report.json``)."""
        return {
            "repo_id": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
            "source": "downloaded" if self.downloaded else "cache",
            "files": [{"file": n, "etag": e} for n, e in self.etags.items()],
        }

    def note(self, label: str) -> str:
        how = (
            "downloaded into the Hugging Face cache"
            if self.downloaded
            else "from the Hugging Face cache"
        )
        return f"{label}: Hub model {self.repo_id} at commit {self.commit}, {how} ({self.snapshot})"


def _weight_names(folder: Path, listing: list[str]) -> list[str]:
    """The weight files of a snapshot whose (repository) file names are ``listing``; the index,
    if listed, must already be in ``folder``."""
    if INDEX_NAME in listing and (folder / INDEX_NAME).exists():
        return list(dict.fromkeys(read_index(folder).values()))
    if SINGLE_NAME in listing:
        return [SINGLE_NAME]
    return sorted(n for n in listing if n.endswith(".safetensors") and "/" not in n)


def _cached_weights(folder: Path) -> list[str] | None:
    """The weight files of a cached snapshot if every one is there, else None."""
    try:
        listing = sorted(os.listdir(folder))
        names = _weight_names(folder, listing)
    except (OSError, CheckpointFormatError):
        return None
    if names and all((folder / n).is_file() for n in names):
        return names
    return None


def _etags(folder: Path, names: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for n in names:
        f = folder / n
        if f.is_symlink() and f.is_file():
            target = resolve_model_file(folder, n)
            if target is not None:
                out[n] = target.name
    return out


def resolve_hub_model(repo_id: str, revision: str | None, *, label: str) -> tuple[Path, HubSource]:
    """Find (or download) Hub model ``repo_id`` at ``revision``; see the module docstring.

    Args:
        repo_id: ``owner/name``.
        revision: a branch, tag or commit (None: the default branch).
        label: how messages name the model (the reference as the user wrote it).

    Returns:
        The snapshot folder and its `HubSource`.

    Raises:
        UsageError: ``huggingface_hub`` is not installed (the ``hub`` extra).
        CheckpointFormatError: not in the cache and ``HF_HUB_OFFLINE`` is set, the model or the
            revision does not exist, it holds no safetensors weights, or the download failed.
    """
    hf = require("huggingface_hub", "hub", f"{label}: no such file or folder; read as a Hub id, it")
    hf_errors = require("huggingface_hub.errors", "hub", f"{label}: reading a Hub id")
    constants = require("huggingface_hub.constants", "hub", f"{label}: reading a Hub id")
    snapshot_download = hf.snapshot_download
    what = f"{repo_id}@{revision}" if revision else repo_id
    meta = [glob.escape(n) for n in (INDEX_NAME, *CARRY_FILES)]
    cache = constants.HF_HUB_CACHE
    try:
        folder = Path(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=meta, local_files_only=True
            )
        )
        names = _cached_weights(folder)
        if names is not None:
            used = [*(n for n in (INDEX_NAME, *CARRY_FILES) if (folder / n).exists()), *names]
            return folder, HubSource(
                repo_id, revision, folder.name, folder, False, _etags(folder, used)
            )
    except (hf_errors.LocalEntryNotFoundError, OSError, ValueError):
        pass  # not (completely) cached: download below, if allowed
    if constants.HF_HUB_OFFLINE:
        raise CheckpointFormatError(
            f"{label}: no such file or folder, and Hub model {what} is not (completely) in the Hugging "
            f"Face cache ({cache}); HF_HUB_OFFLINE is set, so it was not downloaded\n"
            f"hint: unset HF_HUB_OFFLINE to download it, or fetch it once with network access "
            f"(`hf download {repo_id}{' --revision ' + revision if revision else ''}`)"
        )
    endpoint = constants.ENDPOINT
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=meta))
        commit = folder.name
        listing = hf.HfApi().list_repo_files(repo_id, revision=commit)
        names = _weight_names(folder, listing)
        if not names:
            shown = ", ".join(listing[:10]) + (" ..." if len(listing) > 10 else "")
            raise CheckpointFormatError(
                f"{label}: Hub model {what} (commit {commit}) has no safetensors weights (files: {shown})\n"
                "hint: soupkit downloads only safetensors (a pickle can run code); convert the "
                "weights, or use a repository that has model.safetensors"
            )
        folder = Path(
            snapshot_download(
                repo_id, revision=commit, allow_patterns=[glob.escape(n) for n in names]
            )
        )
    except SoupError:
        raise
    except hf_errors.GatedRepoError:
        raise CheckpointFormatError(
            f"{label}: Hub model {repo_id} is gated: accept its conditions on the Hub "
            "and log in\nhint: `hf auth login`, or set HF_TOKEN"
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise CheckpointFormatError(
            f"{label}: no such file or folder, and no model {repo_id} on the Hub ({endpoint})\n"
            "hint: check the spelling; for a private model log in (`hf auth login` or HF_TOKEN)"
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise CheckpointFormatError(
            f"{label}: Hub model {repo_id} has no revision {revision!r}\n"
            "hint: give a branch, a tag or a commit that exists"
        ) from None
    except hf_errors.LocalEntryNotFoundError as e:
        raise CheckpointFormatError(
            f"{label}: no such file or folder; the Hub ({endpoint}) could not be reached and {what} is not "
            f"in the cache ({cache}): {str(e).splitlines()[0]}\n"
            "hint: check the network (HF_ENDPOINT, proxies), or set HF_HUB_OFFLINE=1 to use the cache only"
        ) from None
    except Exception as e:  # any other failure of the download: named, never a traceback
        raise CheckpointFormatError(
            f"{label}: downloading Hub model {what} from {endpoint} failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    used = [*(n for n in (INDEX_NAME, *CARRY_FILES) if (folder / n).exists()), *names]
    return folder, HubSource(repo_id, revision, folder.name, folder, True, _etags(folder, used))
