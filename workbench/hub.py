"""SAE folders on the Hugging Face hub, named by reference: `hf://OWNER/NAME[@REVISION]/PATH/IN/REPO`.

    hf://adamkarvonen/qwen3-8b-saes/saes_Qwen_Qwen3-8B_batch_top_k/resid_post_layer_18/trainer_2
    hf://chanind/gemma-3-1b-batch-topk-matryoshka-saes-w-32k-l0-40@main/blocks.12.hook_resid_post

The syntax is huggingface_hub's own hf:// URI grammar (`huggingface_hub.parse_hf_uri`): REVISION is a
branch, tag or commit sha, written after the repo name; a branch name holding "/" is written with
%2F (`@my%2Fbranch`), except `refs/pr/N` as it is. A `datasets/` prefix names a dataset repo; the
default is a model repo. PATH may be one SAE folder or a folder of them (a series, an export), or
empty for the whole repo.

`resolve_sae_path` turns a reference into a local folder: huggingface_hub's `snapshot_download` fetches
only the files under PATH (allow_patterns), at REVISION, into its cache (HF_HUB_CACHE), and the folder
inside the cached snapshot is returned; the format is then detected as for any local folder. With
HF_HUB_OFFLINE=1, or when the hub cannot be reached, a copy already in the cache is used. Anything that
is not an hf:// reference is returned as a Path, unchanged, so every entry point that takes an SAE
folder calls this first.

Folders in the cache are the hub's copy: commands that write into an SAE folder (`workbench threshold`,
`workbench eval` merging its results) leave hub references alone.
"""

from __future__ import annotations

from pathlib import Path, PurePath

from workbench.errors import WorkbenchError

SCHEME = "hf://"


def is_hub_ref(ref: str | PurePath) -> bool:
    """Whether `ref` is an hf:// reference (a Path made from one reads hf:/..., and counts too)."""
    return str(ref).startswith(SCHEME) or (isinstance(ref, PurePath) and str(ref).startswith("hf:/"))


def _text(ref: str | PurePath) -> str:
    """The reference as written: Path() collapses hf:// to hf:/, which is restored here."""
    text = str(ref)
    return text if text.startswith(SCHEME) else SCHEME + text.removeprefix("hf:/")


def resolve_sae_path(ref: str | PurePath) -> Path:
    """The local folder for `ref`: a local path unchanged, an hf:// reference downloaded (only that
    folder) into huggingface_hub's cache, or found there when offline. A WorkbenchError names the repo
    and the fix when the hub cannot be reached and no copy is cached, or the repo, revision or path is
    not there."""
    if not is_hub_ref(ref):
        return Path(ref)
    text = _text(ref)
    from huggingface_hub import parse_hf_uri, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HfUriError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        uri = parse_hf_uri(text)
    except HfUriError as err:
        raise WorkbenchError(f"{text} is not a hub reference ({err.msg}); write hf://OWNER/NAME[@REVISION]/PATH") from None
    if uri.is_bucket:
        raise WorkbenchError(f"{text} names a bucket; SAEs are read from model repos: hf://OWNER/NAME[@REVISION]/PATH")
    path = uri.path_in_repo.strip("/")
    at = f" at revision {uri.revision}" if uri.revision else ""
    try:
        snapshot = snapshot_download(uri.id, repo_type=uri.type, revision=uri.revision,
                                     allow_patterns=[f"{path}/*"] if path else None)
    except GatedRepoError:
        raise WorkbenchError(f"{text}: the repo {uri.id} is gated; accept its terms on the hub and log in "
                             "(`hf auth login` or HF_TOKEN), then run again") from None
    except RepositoryNotFoundError:
        raise WorkbenchError(f"{text}: no repo {uri.id} on the hub (or it is private); check the name, or log in "
                             "(`hf auth login` or HF_TOKEN) for a private repo") from None
    except RevisionNotFoundError:
        raise WorkbenchError(f"{text}: the repo {uri.id} has no revision {uri.revision}; give a branch, tag or commit "
                             "of it after @") from None
    except LocalEntryNotFoundError as err:  # offline or unreachable, and no (complete) cached copy
        reason = str(err).splitlines()[0]
        raise WorkbenchError(f"{text}: the hub cannot be reached and the cache has no copy of {uri.id}{at} "
                             f"({reason[:160]}); connect to the hub (unset HF_HUB_OFFLINE), or download it once where "
                             "the hub is reachable and point HF_HUB_CACHE at that cache") from None
    except HfHubHTTPError as err:
        raise WorkbenchError(f"{text}: the hub refused the download of {uri.id}{at} "
                             f"({str(err).splitlines()[0][:160]}); check the repo and your login, and run again") from None
    except OSError as err:  # the cache itself: read-only, full, or not a folder
        raise WorkbenchError(f"{text}: cannot use the hub cache ({err}); point HF_HUB_CACHE at a writable folder with "
                             "space, and run again") from None
    folder = Path(snapshot) / path
    if not folder.is_dir() or not any(folder.iterdir()):
        from huggingface_hub import constants

        fix = ("check the path in the repo, or download it with the hub reachable (unset HF_HUB_OFFLINE): offline, "
               "only folders downloaded before are in the cache") if constants.is_offline_mode() else "check the path in the repo"
        raise WorkbenchError(f"{text}: the repo {uri.id}{at} has no files under {path or 'its root'} (snapshot "
                             f"{snapshot}); {fix}")
    return folder
