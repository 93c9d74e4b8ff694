"""`workbench upload EXPORT --repo-id OWNER/NAME`: an export folder, as it is, to a model repo on the hub.

What is uploaded is exactly what `workbench export` wrote there, by the list in its marker
(`.workbench-output.json`), at the same relative paths: that is the published layout already (the
series folder <series>/resid_post_layer_<L>/<name>/ for dictionary_learning, the SAE-id folders
blocks.<L>.hook_resid_post/<name>/ for SAELens, and README.md, the model card, at the top). The marker
itself, temporary files and anything else in the folder are left out.

--dry-run lists the files and their repo paths and imports nothing that can reach the network; the
upload is one commit (huggingface_hub's create_commit), so a failure midway publishes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.files import read_json

# The hub's rule for a repo id: namespace/name of letters, digits, '-', '_', '.', no '--' or '..', at most 96.
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Upload:
    local: Path
    repo_path: str


def check_repo_id(repo_id: str) -> None:
    if not REPO_ID.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id or len(repo_id) > 96 or repo_id.endswith("."):
        raise WorkbenchError(f"--repo-id {repo_id!r} is not a hub repo id; give OWNER/NAME (letters, digits, '-', '_', "
                             "'.'), e.g. my-name/saes-qwen3-batchtopk")


def plan_upload(export: str | Path) -> list[Upload]:
    """Every file of a complete export, with its path in the repo (its path in the export)."""
    from workbench.formats.output import MARKER

    root = Path(export)
    if not root.is_dir():
        raise WorkbenchError(f"{root} is not a folder; give the folder `workbench export --out` wrote")
    fix = f"run `workbench export RUN --to FORMAT --out {root}` again"
    marker = read_json(root / MARKER, fix=fix)
    if marker is None:
        inside = [fmt for fmt in ("dictionary_learning", "saelens") if (root / fmt / MARKER).is_file()]
        shown = ", ".join(f"{fmt}/" for fmt in inside)
        hint = f" (it holds the exports {shown}: give one of them)" if inside else ""
        raise WorkbenchError(f"{root} is not a workbench export: it has no {MARKER}{hint}; give the folder "
                             "`workbench export --out` wrote")
    files = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(marker, dict) or marker.get("command") != "export" or not isinstance(files, list):
        raise WorkbenchError(f"{root / MARKER} does not describe a `workbench export` output; give an export folder")
    if not marker.get("complete"):
        raise WorkbenchError(f"the export in {root} is incomplete (a killed or failed export); {fix}")
    uploads = [Upload(root / name, name) for name in sorted(files) if not name.endswith(".tmp")]
    missing = [u.repo_path for u in uploads if not u.local.is_file()]
    if missing:
        raise WorkbenchError(f"the export in {root} lacks {len(missing)} of its files ({', '.join(missing[:3])}"
                             f"{', ...' if len(missing) > 3 else ''}); {fix}")
    return uploads


def render(uploads: list[Upload], repo_id: str, revision: str | None) -> str:
    where = f"{repo_id}@{revision}" if revision else repo_id
    lines = [f"{u.local} -> {u.repo_path}" for u in uploads]
    return "\n".join([*lines, f"{len(uploads)} files would be uploaded to {where} (dry run: nothing was sent)"])


def upload(export: str | Path, repo_id: str, revision: str | None = None, private: bool = False) -> str:
    """Create the repo (and the branch `revision`) when missing and upload the export as one commit.
    Returns the commit's URL. Needs a hub token (`hf auth login` or HF_TOKEN)."""
    check_repo_id(repo_id)
    uploads = plan_upload(export)
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        info = api.create_commit(
            repo_id, [CommitOperationAdd(path_in_repo=u.repo_path, path_or_fileobj=str(u.local)) for u in uploads],
            commit_message=f"workbench upload of {Path(export).name} ({len(uploads)} files)", repo_type="model",
            revision=revision)
    except LocalTokenNotFoundError:
        raise WorkbenchError("no hub token: run `hf auth login` or set HF_TOKEN, then upload again") from None
    except (HfHubHTTPError, OSError) as err:
        first = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise WorkbenchError(f"the upload to {repo_id} failed ({first}); nothing was committed: check the token's "
                             "write access and the repo id, then upload again") from None
    return str(info.commit_url)
