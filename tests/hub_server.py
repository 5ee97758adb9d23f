"""A stand-in for the Hugging Face hub on loopback, for `tpi pull` tests: the
routes huggingface_hub uses to list a revision (/api/models/ORG/NAME/revision/REV,
with ?blobs=true: sizes, git blob ids, LFS sha256) and to fetch a file
(/ORG/NAME/resolve/REV/FILE, with byte ranges), answering as the hub does
(X-Error-Code on a 404, ETag and X-Repo-Commit on files). Faults on demand: a
connection cut mid-file, errors after it, a file served with a flipped byte."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = "a" * 40
    gated: bool = False

    def sibling(self, name: str) -> dict:
        data = self.files[name]
        out = {"rfilename": name, "size": len(data), "blobId": git_blob_id(data)}
        if name.endswith(LFS_SUFFIXES):
            sha = hashlib.sha256(data).hexdigest()
            out["lfs"] = {"sha256": sha, "size": len(data), "pointerSize": 134}
        return out

    def etag(self, name: str) -> str:
        s = self.sibling(name)
        return s["lfs"]["sha256"] if "lfs" in s else s["blobId"]


@dataclass
class Faults:
    cut_after: dict[str, int] = field(default_factory=dict)  # next GET of FILE stops after N bytes
    errors_after_cut: int = 0  # then this many GETs of it answer 500
    corrupt: set[str] = field(default_factory=set)  # FILE served with its first byte flipped


@dataclass
class Hub:
    repos: dict[str, Repo]
    faults: Faults = field(default_factory=Faults)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, Range
    sent: dict[str, int] = field(default_factory=dict)  # body bytes sent per file
    _pending_errors: dict[str, int] = field(default_factory=dict)

    def fetched(self, name: str) -> list[str | None]:
        """The Range header of every GET of file `name` (None: the whole file)."""
        return [r for m, p, r in self.requests if m == "GET" and p.endswith("/" + name)]


def _handler(hub: Hub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _error(self, status: int, code: str | None = None) -> None:
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _json(self, body: dict) -> None:
            raw = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def do_GET(self) -> None:
            self._serve(head=False)

        def _serve(self, head: bool) -> None:
            path = unquote(urlparse(self.path).path)
            hub.requests.append((self.command, path, self.headers.get("Range")))
            api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
            if api:
                return self._listing(api.group(1), api.group(2))
            got = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if not got:
                return self._error(404)
            return self._file(*got.groups(), head=head)

        def _listing(self, repo_id: str, revision: str | None) -> None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._error(404, "RepoNotFound")
            if revision not in (None, "main", repo.commit):
                return self._error(404, "RevisionNotFound")
            self._json(
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": repo.commit,
                    "private": False,
                    "gated": "manual" if repo.gated else False,
                    "siblings": [repo.sibling(n) for n in sorted(repo.files)],
                }
            )

        def _file(self, repo_id: str, revision: str, name: str, head: bool) -> None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._error(404, "RepoNotFound")
            if repo.gated and "authorization" not in {k.lower() for k in self.headers}:
                return self._error(401, "GatedRepo")
            if name not in repo.files:
                return self._error(404, "EntryNotFound")
            data = repo.files[name]
            if name in hub.faults.corrupt:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            if not head and hub._pending_errors.get(name):
                hub._pending_errors[name] -= 1
                return self._error(500)
            start = 0
            rng = self.headers.get("Range")
            if rng:
                start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            body = data[start:]
            self.send_response(206 if rng else 200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("ETag", f'"{repo.etag(name)}"')
            self.send_header("X-Repo-Commit", repo.commit)
            self.end_headers()
            if head:
                return
            cut = hub.faults.cut_after.pop(name, None)
            if cut is not None:
                hub._pending_errors[name] = hub.faults.errors_after_cut
                body = body[:cut]
            self.wfile.write(body)
            hub.sent[name] = hub.sent.get(name, 0) + len(body)
            if cut is not None:
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)

    return Handler


class HubServer:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def repo_from_dir(directory: Path, extra: dict[str, bytes] | None = None) -> Repo:
    """A repository holding every file of a model directory (and `extra` ones)."""
    files = {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}
    return Repo({**files, **(extra or {})})
