"""Publish a checkpoint folder to the Hugging Face Hub: check it, stage it with its card, upload, deploy the Space.

    publish(dir, repo_id, ...)   -> PublishResult: one commit to the model repo (+ the Space and its variable)
    dry_run(dir, repo_id, out)   -> the folder(s) publish() would upload, written locally; no network
Hub failures become PublishError with a message that says what happened and what to do next.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

from huggingface_hub import ModelCard

from caption_model.hub.card import DEFAULT_LICENSE, REPO_ID, build_model_card
from caption_model.hub.checks import check_checkpoint, smoke_test
from caption_model.config import PROJECT_URL
from caption_model.hub.space import (PROJECT_ROOT, SPACE_REVISION_VARIABLE, SPACE_TOKEN_SECRET, SPACE_VARIABLE,
                                     check_project, stage_space_folder)

SOURCE_VARIABLE = "CAPTION_MODEL_SOURCE"  # where the card's install line points when --install-source is not given
CHECKPOINT_PATTERNS = ("*.json", "*.safetensors", "*.txt")  # what from_pretrained downloads: the Space preloads them


class PublishError(RuntimeError):
    """A Hub operation failed; the message says what happened and the next step."""


def stage_model_folder(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, card: ModelCard) -> list[str]:
    """Copy the checkpoint files and write README.md into `out_dir` -> sorted file list. Never writes the source."""
    files = check_checkpoint(checkpoint_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in files:
        shutil.copyfile(Path(checkpoint_dir) / name, out / name)
    card.save(out / "README.md")
    return sorted([*files, "README.md"])


# ------------------------------------------------------------------------------------------------------------
# Hub errors -> messages with a next step
# ------------------------------------------------------------------------------------------------------------
_CONNECTION_ERROR_NAMES = {"ConnectError", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout",
                           "TimeoutException", "NetworkError", "TransportError", "RemoteProtocolError",
                           "ConnectionError", "ProxyError", "SSLError"}


def _is_connection_error(exc: BaseException) -> bool:
    for e in (exc, exc.__cause__, exc.__context__):
        if e is None:
            continue
        if isinstance(e, ConnectionError):
            return True
        for cls in type(e).__mro__:
            if cls.__name__ in _CONNECTION_ERROR_NAMES and cls.__module__.split(".")[0] in (
                    "httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3"):
                return True
    return False


def explain_error(exc: BaseException, *, action: str, repo_id: str, endpoint: str) -> PublishError | None:
    """Turn a Hub/network exception into a PublishError with the next step; None if it is not one of ours."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    if isinstance(exc, LocalTokenNotFoundError):
        return PublishError(f"{action}: no Hugging Face token found. Run `hf auth login` or set HF_TOKEN to a token "
                            "with write access (https://huggingface.co/settings/tokens).")
    if isinstance(exc, OfflineModeIsEnabled):
        return PublishError(f"{action}: HF_HUB_OFFLINE is set. Unset HF_HUB_OFFLINE to publish "
                            "(or use --dry-run to only write the folder).")
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        server = getattr(exc, "server_message", None) or ""
        detail = f" (server said: {server.strip()})" if server.strip() else ""
        if status == 401:
            return PublishError(f"{action}: the Hub at {endpoint} rejected the token (401 Unauthorized){detail}. "
                                "Run `hf auth login --force` or set HF_TOKEN to a valid token with write access.")
        if status == 403:
            namespace = repo_id.split("/")[0]
            return PublishError(f"{action}: no write access to {repo_id} (403 Forbidden){detail}. The namespace "
                                f"'{namespace}' belongs to someone else or the token is read-only: use --repo-id "
                                "YOUR_USER/NAME, or a token with write access to that namespace "
                                "(fine-grained tokens need the 'write' permission on it).")
        if status == 404:
            return PublishError(f"{action}: {repo_id} or its revision was not found (404){detail}. Check --repo-id "
                                "and --revision, and that the token can see the repo.")
        if status == 429:
            return PublishError(f"{action}: rate limited by the Hub (429){detail}. Wait a few minutes and retry.")
        if status >= 500:
            return PublishError(f"{action}: the Hub at {endpoint} had a server error ({status}){detail}. Nothing "
                                "was changed locally; retry in a few minutes (status: https://status.huggingface.co).")
        return PublishError(f"{action}: the Hub answered {status}{detail}.")
    if _is_connection_error(exc):
        return PublishError(f"{action}: cannot reach the Hub at {endpoint} ({type(exc).__name__}: {exc}). Check the "
                            "network or proxy, and HF_ENDPOINT if you set it; then run the same command again.")
    return None


T = TypeVar("T")


def _hub_call(action: str, repo_id: str, endpoint: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except PublishError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised unless it is a known Hub/network failure
        explained = explain_error(e, action=action, repo_id=repo_id, endpoint=endpoint)
        if explained is None:
            raise
        raise explained from e


# ------------------------------------------------------------------------------------------------------------
# publishing
# ------------------------------------------------------------------------------------------------------------
@dataclass
class PublishResult:
    repo_url: str
    commit_url: str | None
    files: list[str]
    space_url: str | None = None
    space_files: list[str] = field(default_factory=list)
    user: str | None = None


def hub_endpoint() -> str:
    """The Hub URL: HF_ENDPOINT if set, else huggingface_hub's default."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _commit_folder(api, folder: Path, repo_id: str, repo_type: str, message: str, revision: str | None):
    from huggingface_hub import CommitOperationAdd

    operations = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
                  for p in sorted(folder.rglob("*")) if p.is_file()]
    return api.create_commit(repo_id, operations=operations, commit_message=message, repo_type=repo_type,
                             revision=revision)


def check_write_access(api, repo_ids: list[str], endpoint: str) -> str:
    """whoami + namespace check -> user name; PublishError if there is no token or a namespace is not writable."""
    from huggingface_hub import get_token

    if api.token is None and get_token() is None:
        raise PublishError("no Hugging Face token found. Run `hf auth login` or set HF_TOKEN to a token with write "
                           "access (https://huggingface.co/settings/tokens).")
    me = _hub_call("checking the token", repo_ids[0], endpoint, api.whoami)
    user = me.get("name", "")
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise PublishError(f"the token of '{user}' is read-only. Create a token with write access at "
                           "https://huggingface.co/settings/tokens, then `hf auth login --force` or set HF_TOKEN.")
    namespaces = {user, *(org.get("name") for org in me.get("orgs") or [])}
    for repo_id in repo_ids:
        namespace = repo_id.split("/")[0]
        if namespace not in namespaces:
            raise PublishError(f"{repo_id} is owned by '{namespace}', but the token belongs to '{user}' "
                               f"(can write to: {', '.join(sorted(n for n in namespaces if n))}). Use "
                               f"{user}/{repo_id.split('/')[-1]} instead, or log in with a token of '{namespace}'.")
    return user


def resolve_install_source(source: str | None = None, project_root: Path = PROJECT_ROOT) -> str:
    """The git URL the card's install line uses: `source`, else $CAPTION_MODEL_SOURCE, else this clone's `origin`
    remote (an https or ssh URL). PublishError when none is found or it is the README's placeholder."""
    source = source or os.environ.get(SOURCE_VARIABLE) or _git_origin(project_root)
    how = (f"pass --install-source https://github.com/OWNER/REPO (or set ${SOURCE_VARIABLE}): the git URL the model "
           "card tells readers to `pip install` the caption_model package from")
    if not source:
        raise PublishError(f"no install source for the model card: this clone has no http(s) or ssh 'origin' "
                           f"remote; {how}")
    if "USER/REPO" in source or source.removeprefix("git+").rstrip("/") == PROJECT_URL:
        raise PublishError(f"the install source {source!r} is the README's placeholder; {how}")
    if not re.match(r"^(git\+)?(https?|ssh)://\S+$", source):
        raise PublishError(f"the install source must be a git URL such as https://github.com/OWNER/REPO "
                           f"(optionally @TAG), got {source!r}")
    return source


def _git_origin(project_root: Path) -> str | None:
    """This clone's `origin` URL as https (git@host:owner/repo -> https://host/owner/repo); None if it has none."""
    try:
        url = subprocess.run(["git", "-C", str(project_root), "remote", "get-url", "origin"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if match := re.match(r"^git@([^:]+):(.+)$", url):
        url = f"https://{match.group(1)}/{match.group(2)}"
    return url if re.match(r"^(https?|ssh)://", url) else None


def _check_inputs(checkpoint_dir, repo_id: str, space_id: str | None, log: Callable[[str], None], *,
                  private: bool = False, space_token: str | None = None) -> None:
    """Repo ids well formed, checkpoint complete and able to caption a test image: before any network call."""
    _check_repo_id(repo_id, "--repo-id")
    if space_id:
        _check_repo_id(space_id, "--space")
        check_project()
        if private and not space_token:
            raise PublishError(
                f"--private --space: the Space cannot read a private model without a token. Create a read-only "
                f"token at https://huggingface.co/settings/tokens and pass it with --space-token (it is stored as "
                f"the Space secret {SPACE_TOKEN_SECRET}; the Space is made private too), or publish without "
                "--private.")
    check_checkpoint(checkpoint_dir)
    caption = smoke_test(checkpoint_dir)
    log(f"checkpoint OK: {checkpoint_dir} captions a test image as {caption.text!r}")


def publish(checkpoint_dir: str | os.PathLike, repo_id: str, *, private: bool = False,
            commit_message: str = "Upload image captioner", revision: str | None = None,
            space_id: str | None = None, license: str = DEFAULT_LICENSE, dataset: str | None = None,
            token: str | None = None, endpoint: str | None = None, log: Callable[[str], None] = print,
            install_source: str | None = None, space_token: str | None = None) -> PublishResult:
    """Check + smoke-test the checkpoint, then upload it (and the Space) in one commit per repo. A private model's
    Space is private too and reads the model with `space_token` (a Space secret)."""
    from huggingface_hub import HfApi

    _check_inputs(checkpoint_dir, repo_id, space_id, log, private=private, space_token=space_token)
    install_source = resolve_install_source(install_source)

    endpoint = (endpoint or hub_endpoint()).rstrip("/")
    api = HfApi(endpoint=endpoint, token=token)
    user = check_write_access(api, [repo_id, *([space_id] if space_id else [])], endpoint)
    log(f"logged in to {endpoint} as {user}")
    with tempfile.TemporaryDirectory(prefix="push_to_hub_") as tmp:
        staged = Path(tmp) / "model"
        card = build_model_card(checkpoint_dir, repo_id, space_id=space_id, license=license, dataset=dataset,
                                install_source=install_source)
        files = stage_model_folder(checkpoint_dir, staged, card)
        repo_url = _hub_call(f"creating model repo {repo_id}", repo_id, endpoint,
                             lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"))
        if revision and revision != "main":
            _hub_call(f"creating branch {revision}", repo_id, endpoint,
                      lambda: api.create_branch(repo_id, branch=revision, exist_ok=True))
        commit = _hub_call(f"uploading to {repo_id}", repo_id, endpoint,
                           lambda: _commit_folder(api, staged, repo_id, "model", commit_message, revision))
        log(f"uploaded {len(files)} files to {repo_url} ({commit.commit_url})")
        result = PublishResult(repo_url=str(repo_url), commit_url=commit.commit_url, files=files, user=user)
        if space_id:
            preload = preload_entry(repo_id, files, commit.oid)
            result.space_url, result.space_files = _publish_space(
                api, endpoint, Path(tmp) / "space", repo_id, space_id, revision, license, commit_message, log,
                private=private, space_token=space_token, preload=preload)
    return result


def preload_entry(repo_id: str, files: list[str], commit: str | None = None) -> str:
    """The Space card's `preload_from_hub` line: the model files from_pretrained reads, at `commit` when known,
    downloaded when the Space is built instead of at every cold start."""
    needed = [name for name in files if any(fnmatch.fnmatch(name, p) for p in CHECKPOINT_PATTERNS)]
    return " ".join([repo_id, ",".join(needed), *([commit] if commit else [])])


def _publish_space(api, endpoint, staged, repo_id, space_id, revision, license, commit_message, log, *,
                   private: bool = False, space_token: str | None = None, preload: str | None = None):
    space_files = stage_space_folder(staged, repo_id, space_id, license=license, preload=preload)
    space_url = _hub_call(f"creating Space {space_id}", space_id, endpoint,
                          lambda: api.create_repo(space_id, repo_type="space", space_sdk="gradio", exist_ok=True,
                                                  private=private))
    if private:  # an existing public Space is made private too: it would show a private model to everyone
        _hub_call(f"making the Space {space_id} private", space_id, endpoint,
                  lambda: api.update_repo_settings(space_id, private=True, repo_type="space"))
    if space_token:
        _hub_call(f"setting the Space secret {SPACE_TOKEN_SECRET}", space_id, endpoint,
                  lambda: api.add_space_secret(space_id, SPACE_TOKEN_SECRET, space_token,
                                               description="Read token: the app loads the private model with it"))
    before = _hub_call(f"reading Space {space_id}", space_id, endpoint,
                       lambda: api.repo_info(space_id, repo_type="space").sha)
    commit = _hub_call(f"uploading the Space {space_id}", space_id, endpoint,
                       lambda: _commit_folder(api, staged, space_id, "space", commit_message, None))
    _hub_call(f"setting the Space variable {SPACE_VARIABLE}", space_id, endpoint,
              lambda: api.add_space_variable(space_id, SPACE_VARIABLE, repo_id,
                                             description="Model repo the app loads"))
    # always set: a later push to main must not leave the Space on an earlier push's branch
    _hub_call(f"setting the Space variable {SPACE_REVISION_VARIABLE}", space_id, endpoint,
              lambda: api.add_space_variable(space_id, SPACE_REVISION_VARIABLE, revision or "main",
                                             description="Model revision the app loads"))
    if commit.oid == before:  # no file changed: restart so the app loads the new weights
        _hub_call(f"restarting the Space {space_id}", space_id, endpoint, lambda: api.restart_space(space_id))
    log(f"Space {space_url} updated ({len(space_files)} files), {SPACE_VARIABLE}={repo_id}")
    return str(space_url), space_files


def dry_run(checkpoint_dir: str | os.PathLike, repo_id: str, out_dir: str | os.PathLike | None = None, *,
            space_id: str | None = None, license: str = DEFAULT_LICENSE, dataset: str | None = None,
            log: Callable[[str], None] = print, install_source: str | None = None, private: bool = False,
            space_token: str | None = None) -> Path:
    """Write what publish() would upload into `out_dir` (model/ and, with a Space, space/); no network."""
    _check_inputs(checkpoint_dir, repo_id, space_id, log, private=private, space_token=space_token)
    install_source = resolve_install_source(install_source)
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="push_to_hub_dry_run_"))
    if out.exists() and any(out.iterdir()):
        raise PublishError(f"--dry-run-dir {out} is not empty; give a new or empty folder")
    card = build_model_card(checkpoint_dir, repo_id, space_id=space_id, license=license, dataset=dataset,
                            install_source=install_source)
    files = stage_model_folder(checkpoint_dir, out / "model", card)
    log(f"dry run: would upload to model repo {repo_id}, written to {out / 'model'}:")
    for name in files:
        log(f"  {name}  ({(out / 'model' / name).stat().st_size} bytes)")
    if space_id:
        space_files = stage_space_folder(out / "space", repo_id, space_id, license=license,
                                         preload=preload_entry(repo_id, files))
        log(f"dry run: would upload to Space {space_id} (and set {SPACE_VARIABLE}={repo_id}), "
            f"written to {out / 'space'}:")
        for name in space_files:
            log(f"  {name}")
    return out


def _check_repo_id(repo_id: str, flag: str) -> None:
    if not REPO_ID.match(repo_id or ""):
        raise PublishError(f"{flag} must look like USER/NAME, got {repo_id!r}")

