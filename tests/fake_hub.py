"""A small in-memory Hugging Face Hub that the real `huggingface_hub` client can talk to, for offline tests.

It speaks the endpoints that uploads and downloads use: whoami, repo creation, README YAML validation, preupload,
NDJSON commits (regular base64 files only: preupload answers uploadMode "regular" for every file, so no LFS/Xet
server is needed), branches, repo info / revision info, tree and paths-info listings, Space variables, secrets and
visibility settings, and
`resolve/` downloads (HEAD and GET with X-Repo-Commit, ETag and Content-Length).

    with FakeHub(user="alice", token="hf_alice") as hub:
        os.environ["HF_ENDPOINT"] = hub.url
        ...
        hub.repos[("model", "alice/tiny")].files["config.json"]   # bytes

Faults: `hub.fail(status, path_prefix="/api/")` makes matching requests answer `status` with a Hub-style JSON error.
Every request is recorded in `hub.requests` as (method, path).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

REPO_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_API_KINDS = {"models": "model", "datasets": "dataset", "spaces": "space"}


def git_blob_oid(content: bytes) -> str:
    """The git SHA-1 of a blob, what the Hub reports as a regular file's oid."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def closed_port() -> int:
    """A localhost TCP port with nothing listening on it (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Commit:
    oid: str
    summary: str
    files: dict[str, bytes]  # the whole tree after this commit


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool = False
    sdk: str | None = None
    branches: dict[str, list[Commit]] = field(default_factory=dict)  # branch -> commits, oldest first
    variables: dict[str, dict] = field(default_factory=dict)  # Space variables: key -> {"value", "description"}
    secrets: dict[str, dict] = field(default_factory=dict)  # Space secrets: key -> {"value", "description"}
    restarts: int = 0  # Space restarts requested

    def head(self, revision: str = "main") -> Commit | None:
        """The commit a branch name or a commit oid points to (None if unknown)."""
        if revision in self.branches:
            return self.branches[revision][-1]
        for commits in self.branches.values():
            for commit in commits:
                if commit.oid == revision:
                    return commit
        return None

    @property
    def files(self) -> dict[str, bytes]:
        """Files at the head of main."""
        return self.head("main").files


class FakeHub:
    """A threaded HTTP server on 127.0.0.1 (random port) holding repos in memory."""

    def __init__(self, user: str = "alice", token: str = "hf_test_token", orgs: tuple[str, ...] = ()):
        self.user = user
        self.token = token
        self.orgs = tuple(orgs)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self._faults: list[tuple[int, str, str | None]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ---- test helpers -----------------------------------------------------------------------------
    def fail(self, status: int, path_prefix: str = "/", method: str | None = None) -> None:
        """Answer `status` to every request whose path starts with `path_prefix` (and method, if given)."""
        self._faults.append((status, path_prefix, method))

    def add_repo(self, repo_id: str, repo_type: str = "model", files: dict[str, bytes] | None = None,
                 private: bool = False) -> Repo:
        """Create a repo directly (e.g. one owned by another user), with an initial commit."""
        repo = Repo(repo_type, repo_id, private=private)
        repo.branches["main"] = [Commit(_new_oid(), "initial commit", dict(files or {".gitattributes": b""}))]
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def commits(self, repo_id: str, repo_type: str = "model", branch: str = "main") -> list[Commit]:
        return self.repos[(repo_type, repo_id)].branches[branch]

    def api_requests(self) -> list[tuple[str, str]]:
        """Recorded requests, without the client's agent-registry probe."""
        return [r for r in self.requests if not r[1].startswith("/api/agent-harnesses")]


def _new_oid() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex[:8]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


class _HubError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.error_code = status, message, error_code


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    # ---- plumbing ---------------------------------------------------------------------------------
    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            return self.rfile.read(length)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _dispatch(self, method: str) -> None:
        hub = self.hub
        split = urlsplit(self.path)
        path, query = split.path, parse_qs(split.query)
        body = self._body() if method in ("POST", "PUT", "DELETE") else b""
        with hub._lock:
            hub.requests.append((method, path))
        try:
            for status, prefix, fault_method in hub._faults:
                if path.startswith(prefix) and fault_method in (None, method):
                    raise _HubError(status, f"Simulated error {status}")
            with hub._lock:
                self._route(method, path, query, body)
        except _HubError as e:
            headers = {"X-Error-Message": e.message}
            if e.error_code:
                headers["X-Error-Code"] = e.error_code
            self._json(e.status, {"error": e.message}, headers)

    # ---- auth -------------------------------------------------------------------------------------
    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[len("Bearer "):] if auth.startswith("Bearer ") else None

    def _require_user(self) -> str:
        token = self._token()
        if token is None:
            raise _HubError(401, "You must be authenticated to access this resource")
        if token != self.hub.token:
            raise _HubError(401, "Invalid credentials in Authorization header")
        return self.hub.user

    def _can_write(self, repo_id: str) -> bool:
        return repo_id.split("/")[0] in (self.hub.user, *self.hub.orgs)

    def _repo(self, repo_type: str, repo_id: str, write: bool = False) -> Repo:
        repo = self.hub.repos.get((repo_type, repo_id))
        authed = self._token() == self.hub.token
        if repo is None or (repo.private and not (authed and self._can_write(repo_id))):
            raise _HubError(404, "Repository not found", "RepoNotFound")
        if write:
            self._require_user()
            if not self._can_write(repo_id):
                raise _HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    # ---- routes -----------------------------------------------------------------------------------
    def _route(self, method: str, path: str, query: dict, body: bytes) -> None:
        if path == "/api/agent-harnesses":
            return self._json(200, {"standardEnvVars": [], "harnesses": {}})
        if path == "/api/whoami-v2" and method == "GET":
            return self._whoami()
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo(json.loads(body or b"{}"))
        if path == "/api/validate-yaml" and method == "POST":
            return self._validate_yaml(json.loads(body or b"{}"))
        m = re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/(.*))?", path)
        if m:
            return self._repo_api(method, _API_KINDS[m[1]], m[2], m[3] or "", query, body)
        m = re.fullmatch(r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m and method in ("GET", "HEAD"):
            kind = {"datasets": "dataset", "spaces": "space"}.get(m[1], "model")
            return self._resolve(kind, m[2], unquote(m[3]), unquote(m[4]))
        raise _HubError(404, f"Not found: {method} {path}")

    def _whoami(self) -> None:
        user = self._require_user()
        self._json(200, {
            "type": "user", "id": "0" * 24, "name": user, "fullname": user.title(),
            "orgs": [{"type": "org", "name": org} for org in self.hub.orgs],
            "auth": {"type": "access_token", "accessToken": {"displayName": "tests", "role": "write"}},
        })

    def _create_repo(self, payload: dict) -> None:
        self._require_user()
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.hub.user}/{payload['name']}"
        url = f"{self.hub.url}/{REPO_PREFIXES[repo_type]}{repo_id}"
        if not self._can_write(repo_id):
            raise _HubError(403, f"You don't have the rights to create a {repo_type} under the namespace "
                                 f"\"{repo_id.split('/')[0]}\"")
        if (repo_type, repo_id) in self.hub.repos:
            return self._json(409, {"error": f"You already created this {repo_type} repo", "url": url})
        if repo_type == "space" and payload.get("sdk") not in ("gradio", "docker", "static"):
            raise _HubError(400, f"Invalid sdk {payload.get('sdk')!r}")
        repo = self.hub.add_repo(repo_id, repo_type,
                                 private=payload.get("visibility") == "private" or bool(payload.get("private")))
        repo.sdk = payload.get("sdk")
        self._json(200, {"url": url, "name": repo_id, "id": "1" * 24})

    def _validate_yaml(self, payload: dict) -> None:
        content = payload.get("content", "")
        m = re.match(r"^---\r?\n(.*?)\r?\n---\r?\n", content, re.S)
        errors = []
        if m:
            try:
                meta = yaml.safe_load(m[1])
                if meta is not None and not isinstance(meta, dict):
                    errors.append({"message": "metadata must be a YAML mapping"})
            except yaml.YAMLError as e:
                errors.append({"message": f"invalid YAML: {e}"})
        if errors:
            return self._json(400, {"errors": errors, "warnings": []})
        self._json(200, {"errors": [], "warnings": []})

    def _repo_api(self, method: str, repo_type: str, repo_id: str, rest: str, query: dict, body: bytes) -> None:
        parts = rest.split("/", 1) if rest else []
        action = parts[0] if parts else ""
        arg = unquote(parts[1]) if len(parts) > 1 else None
        if action == "" and method == "GET":
            return self._info(repo_type, repo_id, "main")
        if action == "revision" and method == "GET":
            return self._info(repo_type, repo_id, arg)
        if action == "preupload" and method == "POST":
            return self._preupload(repo_type, repo_id, arg, json.loads(body))
        if action == "commit" and method == "POST":
            return self._commit(repo_type, repo_id, arg, body)
        if action == "branch" and method == "POST":
            return self._branch(repo_type, repo_id, arg, json.loads(body or b"{}"))
        if action == "tree" and method == "GET":
            return self._tree(repo_type, repo_id, arg or "main")
        if action == "paths-info" and method == "POST":
            return self._paths_info(repo_type, repo_id, arg or "main", body)
        if action == "restart" and repo_type == "space" and method == "POST":
            repo = self._repo(repo_type, repo_id, write=True)
            repo.restarts += 1
            return self._json(200, {"stage": "RUNNING_BUILDING", "hardware": {"current": None,
                                                                             "requested": "cpu-basic"}})
        if action == "variables" and repo_type == "space":
            repo = self._repo(repo_type, repo_id, write=True)
            if method == "POST":
                payload = json.loads(body)
                repo.variables[payload["key"]] = {"value": payload["value"],
                                                  "description": payload.get("description")}
            return self._json(200, {k: {"key": k, **v, "updatedAt": _now()} for k, v in repo.variables.items()})
        if action == "secrets" and repo_type == "space" and method == "POST":
            repo = self._repo(repo_type, repo_id, write=True)
            payload = json.loads(body)
            repo.secrets[payload["key"]] = {"value": payload["value"], "description": payload.get("description")}
            return self._json(200, {})
        if action == "settings" and method == "PUT":
            repo = self._repo(repo_type, repo_id, write=True)
            payload = json.loads(body)
            if "visibility" in payload or "private" in payload:
                repo.private = payload.get("visibility") == "private" or bool(payload.get("private"))
            return self._json(200, {})
        raise _HubError(404, f"Not found: {method} /api/{repo_type}s/{repo_id}/{rest}")

    def _commit_at(self, repo: Repo, revision: str) -> Commit:
        commit = repo.head(revision)
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _info(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_type, repo_id)
        commit = self._commit_at(repo, revision)
        info = {
            "_id": "2" * 24, "id": repo_id, "author": repo_id.split("/")[0], "sha": commit.oid,
            "private": repo.private, "gated": False, "disabled": False, "tags": [], "likes": 0, "downloads": 0,
            "lastModified": _now(), "createdAt": _now(),
            "siblings": [{"rfilename": p} for p in sorted(commit.files)],
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        if repo_type == "space":
            info["sdk"] = repo.sdk
            info["runtime"] = {"stage": "BUILDING", "hardware": {"current": None, "requested": "cpu-basic"}}
        self._json(200, info)

    def _preupload(self, repo_type: str, repo_id: str, revision: str, payload: dict) -> None:
        repo = self._repo(repo_type, repo_id, write=True)
        files = repo.head(revision).files if repo.head(revision) else {}
        answer = []
        for f in payload["files"]:
            existing = files.get(f["path"])
            answer.append({"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                           "oid": git_blob_oid(existing) if existing is not None else None})
        self._json(200, {"files": answer, "commitOid": repo.head("main").oid})

    def _commit(self, repo_type: str, repo_id: str, revision: str, body: bytes) -> None:
        repo = self._repo(repo_type, repo_id, write=True)
        parent = self._commit_at(repo, revision)
        if revision not in repo.branches:
            raise _HubError(400, f"Can only commit to a branch, got {revision}")
        files = dict(parent.files)
        summary = None
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value["summary"]
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise _HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: c for p, c in files.items() if not p.startswith(prefix)}
            else:  # lfsFile would need an LFS server: preupload never asks for it
                raise _HubError(400, f"unsupported commit operation {key!r}")
        if not summary:
            raise _HubError(400, "commit summary is required")
        commit = Commit(_new_oid(), summary, files)
        repo.branches[revision].append(commit)
        url = f"{self.hub.url}/{REPO_PREFIXES[repo_type]}{repo_id}/commit/{commit.oid}"
        self._json(200, {"success": True, "commitOid": commit.oid, "commitUrl": url, "pullRequestUrl": None})

    def _branch(self, repo_type: str, repo_id: str, branch: str, payload: dict) -> None:
        repo = self._repo(repo_type, repo_id, write=True)
        if branch in repo.branches:
            raise _HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = self._commit_at(repo, payload.get("startingPoint") or "main")
        repo.branches[branch] = [start]
        self._json(200, {})

    def _entries(self, commit: Commit) -> list[dict]:
        return [{"type": "file", "path": p, "size": len(c), "oid": git_blob_oid(c)}
                for p, c in sorted(commit.files.items())]

    def _tree(self, repo_type: str, repo_id: str, rest: str) -> None:
        revision, _, folder = rest.partition("/")
        repo = self._repo(repo_type, repo_id)
        entries = self._entries(self._commit_at(repo, revision))
        prefix = folder.rstrip("/") + "/" if folder else ""
        self._json(200, [e for e in entries if e["path"].startswith(prefix)])

    def _paths_info(self, repo_type: str, repo_id: str, revision: str, body: bytes) -> None:
        repo = self._repo(repo_type, repo_id)
        wanted = set(parse_qs(body.decode()).get("paths", []))
        entries = self._entries(self._commit_at(repo, revision))
        self._json(200, [e for e in entries if e["path"] in wanted])

    def _resolve(self, repo_type: str, repo_id: str, revision: str, filename: str) -> None:
        repo = self._repo(repo_type, repo_id)
        commit = self._commit_at(repo, revision)
        if filename not in commit.files:
            raise _HubError(404, f"Entry not found: {filename}", "EntryNotFound")
        content = commit.files[filename]
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{git_blob_oid(content)}"', "Accept-Ranges": "bytes"}
        self._send(200, content, headers, content_type="application/octet-stream")
