"""A Hub-compatible HTTP server on 127.0.0.1 for the publishing tests, and tests that it answers like the Hub.

No package on PyPI provides a working local Hub server: `hf-local-hub` ships only its Python client (the Go
server it starts is in neither its wheel nor its sdist). So the tests run this small server, which speaks the
part of the Hub's HTTP API that `huggingface_hub` uses to create a repo, validate a card's YAML header,
commit files (`preupload` + NDJSON `commit`, files inline as base64), read repo info and download files
(`HEAD`/`GET .../resolve/<revision>/<path>` with `X-Repo-Commit` and `ETag` headers, and the Hub's
`X-Error-Code` on a missing repo or file). The client side is the real `huggingface_hub` and `transformers`
network code, unchanged; only the server is ours. Requests it does not know are answered 404 and recorded in
`HubServer.unknown_requests`, so that a test can show what a new client version started asking for.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import pytest
import yaml


@dataclass
class _Repo:
    private: bool = False
    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)  # (sha, snapshot), oldest first

    @property
    def head(self) -> tuple[str, dict[str, bytes]]:
        return self.commits[-1]

    def snapshot(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        if revision == "main":
            return self.head
        return next((commit for commit in self.commits if commit[0] == revision), None)


def _git_blob_sha(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def card_metadata(readme: bytes) -> dict | None:
    """The YAML header of a model card, or None when it has none; raises `yaml.YAMLError` if invalid."""
    match = re.match(r"^---\n(.*?)\n---\n", readme.decode("utf-8"), re.DOTALL)
    return yaml.safe_load(match.group(1)) if match else None


class HubServer:
    """A Hub-compatible server in a background thread: `with HubServer() as hub: HfApi(endpoint=hub.url)`."""

    def __init__(self, token: str = "hf_local_test_token"):
        self.token = token
        self.repos: dict[str, _Repo] = {}
        self.unknown_requests: list[str] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._server.shutdown()
        self._server.server_close()

    def files(self, repo_id: str) -> dict[str, bytes]:
        return self.repos[repo_id].head[1]

    def _handler_class(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            # ---- helpers ----
            def _send(
                self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"
            ):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, status: int, payload, headers: dict | None = None):
                self._send(status, json.dumps(payload).encode(), headers)

            def _snapshot(self, repo_id: str, revision: str):
                """`(repo, sha, files)` of a repo at a revision, or None after answering the Hub's 404."""
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._error(404, "RepoNotFound", f"Repository not found: {repo_id}")
                    return None
                found = repo.snapshot(revision)
                if found is None:
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                    return None
                return (repo, *found)

            def _error(self, status: int, code: str, message: str):
                self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _authorised(self) -> bool:
                if self.headers.get("Authorization") == f"Bearer {hub.token}":
                    return True
                self._json(401, {"error": "Invalid credentials in Authorization header"})
                return False

            def _unknown(self):
                hub.unknown_requests.append(f"{self.command} {self.path}")
                self._json(404, {"error": f"not implemented by the local test hub: {self.command} {self.path}"})

            # ---- routes ----
            def do_HEAD(self):
                self._get_or_head()

            def do_GET(self):
                self._get_or_head()

            def _get_or_head(self):
                path = unquote(urlsplit(self.path).path)
                if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
                    return self._model_info(match.group(1), match.group(2) or "main")
                if match := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                    return self._resolve(*match.groups())
                if path == "/api/whoami-v2":
                    return (
                        self._json(200, {"type": "user", "name": "local", "orgs": []}) if self._authorised() else None
                    )
                self._unknown()

            def do_POST(self):
                path = unquote(urlsplit(self.path).path)
                body = self._body()
                if path == "/api/repos/create":
                    return self._create_repo(json.loads(body)) if self._authorised() else None
                if path == "/api/validate-yaml":
                    return self._validate_yaml(json.loads(body))
                if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path):
                    return self._preupload(match.group(1), json.loads(body)) if self._authorised() else None
                if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path):
                    return self._commit(match.group(1), match.group(2), body) if self._authorised() else None
                self._unknown()

            def _create_repo(self, request: dict):
                if request.get("type", "model") not in (None, "model"):
                    return self._error(400, "BadRequest", "the local test hub hosts model repos only")
                repo_id = f"{request.get('organization') or 'local'}/{request['name']}"
                with hub._lock:
                    if repo_id in hub.repos:
                        return self._json(
                            409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"}
                        )
                    initial = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
                    repo = _Repo(private=bool(request.get("private")))
                    repo.commits.append((hashlib.sha1(repo_id.encode()).hexdigest(), initial))
                    hub.repos[repo_id] = repo
                self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

            def _validate_yaml(self, request: dict):
                try:
                    metadata = card_metadata(request["content"].encode())
                except yaml.YAMLError as error:
                    return self._json(400, {"error": f"Invalid metadata in README.md: {error}"})
                if metadata is not None and not isinstance(metadata, dict):
                    return self._json(400, {"error": "Invalid metadata in README.md: the header is not a mapping"})
                warnings = [] if metadata else [{"message": "empty or missing yaml metadata in repo card"}]
                self._json(200, {"errors": [], "warnings": warnings})

            def _preupload(self, repo_id: str, request: dict):
                if repo_id not in hub.repos:
                    return self._error(404, "RepoNotFound", f"Repository not found: {repo_id}")
                files = hub.files(repo_id)
                self._json(
                    200,
                    {
                        "files": [
                            {
                                "path": item["path"],
                                "uploadMode": "regular",
                                "shouldIgnore": False,
                                "oid": _git_blob_sha(files[item["path"]]) if item["path"] in files else None,
                            }
                            for item in request["files"]
                        ]
                    },
                )

            def _commit(self, repo_id: str, revision: str, body: bytes):
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return self._error(404, "RepoNotFound", f"Repository not found: {repo_id}")
                if revision != "main":
                    return self._error(400, "BadRequest", "the local test hub commits to main only")
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                with hub._lock:
                    parent_sha, parent = repo.head
                    snapshot = dict(parent)
                    for line in lines:
                        key, value = line["key"], line["value"]
                        if key == "header":
                            summary = value.get("summary", "")
                            if value.get("parentCommit") not in (None, parent_sha):
                                return self._error(412, "BadRequest", "parentCommit is not the head of main")
                        elif key == "file":
                            if value.get("encoding") != "base64":
                                return self._error(400, "BadRequest", "files must be sent inline as base64")
                            snapshot[value["path"]] = base64.b64decode(value["content"])
                        elif key == "deletedFile":
                            if snapshot.pop(value["path"], None) is None:
                                return self._error(404, "EntryNotFound", "A file with this name doesn't exist")
                        elif key == "deletedFolder":
                            prefix = value["path"].rstrip("/") + "/"
                            snapshot = {p: c for p, c in snapshot.items() if not p.startswith(prefix)}
                        else:
                            return self._error(400, "BadRequest", f"the local test hub cannot apply {key!r} lines")
                    sha = hashlib.sha1(
                        json.dumps([parent_sha, summary, sorted(snapshot)]).encode()
                        + b"".join(snapshot[p] for p in sorted(snapshot))
                    ).hexdigest()
                    repo.commits.append((sha, snapshot))
                self._json(
                    200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None}
                )

            def _model_info(self, repo_id: str, revision: str):
                found = self._snapshot(repo_id, revision)
                if found is None:
                    return
                repo, sha, files = found
                card = card_metadata(files["README.md"]) if "README.md" in files else None
                self._json(
                    200,
                    {
                        "id": repo_id,
                        "modelId": repo_id,
                        "sha": sha,
                        "private": repo.private,
                        "siblings": [{"rfilename": name} for name in sorted(files)],
                        "cardData": card,
                        "tags": (card or {}).get("tags", []),
                        "pipeline_tag": (card or {}).get("pipeline_tag"),
                        "library_name": (card or {}).get("library_name"),
                    },
                )

            def _resolve(self, repo_id: str, revision: str, filename: str):
                found = self._snapshot(repo_id, revision)
                if found is None:
                    return
                repo, sha, files = found
                if filename not in files:
                    return self._send(
                        404,
                        b"Entry not found",
                        {
                            "X-Error-Code": "EntryNotFound",
                            "X-Error-Message": "Entry not found",
                            "X-Repo-Commit": sha,
                        },
                        content_type="text/plain",
                    )
                content = files[filename]
                self._send(
                    200,
                    content,
                    {"X-Repo-Commit": sha, "ETag": f'"{_git_blob_sha(content)}"'},
                    content_type="application/octet-stream",
                )

        return Handler


# ---- the server answers like the Hub for the calls huggingface_hub makes ----


@pytest.fixture
def hub(monkeypatch):
    """A running local hub; the suite's offline mode is lifted for it (it listens on 127.0.0.1 only)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    with HubServer() as server:
        yield server


def test_local_hub_round_trips_a_commit_through_huggingface_hub(hub, tmp_path):
    from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download

    api = HfApi(endpoint=hub.url, token=hub.token)
    repo = api.create_repo("team/example")
    assert repo.repo_id == "team/example"
    api.create_repo("team/example", exist_ok=True)  # 409 is understood as "exists"
    api.create_commit("team/example", [CommitOperationAdd("a/b.txt", b"hello")], commit_message="add")
    info = api.model_info("team/example")
    assert "a/b.txt" in [sibling.rfilename for sibling in info.siblings]
    path = hf_hub_download("team/example", "a/b.txt", endpoint=hub.url, cache_dir=tmp_path, token=hub.token)
    assert open(path, "rb").read() == b"hello"
    assert hub.unknown_requests == []


def test_local_hub_reports_missing_repos_and_files_with_the_hubs_error_codes(hub, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    api = HfApi(endpoint=hub.url, token=hub.token)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("team/missing")
    api.create_repo("team/example")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("team/example", "nope.json", endpoint=hub.url, cache_dir=tmp_path, token=hub.token)


def test_local_hub_refuses_uploads_without_the_token(hub):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    with pytest.raises(HfHubHTTPError):
        HfApi(endpoint=hub.url, token="hf_wrong").create_repo("team/example")
