"""`tpi pull ORG/NAME[@REVISION]` and `--model ORG/NAME`: download a model from the
Hugging Face hub with `huggingface_hub` (its endpoint, HF_TOKEN, headers, retries).

Files go into $TPI_HOME/models/.pulling/NAME first, each as FILE.part until it
is whole: a pull that stops (Ctrl-C, a dropped network) goes on from where it
was, within one run (the client resumes a dropped connection by itself) and
across runs (the next pull asks only for the bytes after the .part's end).
Each finished file is checked against the checksum the hub publishes (sha256
for Git LFS files, the git blob id for others); one that does not match is
deleted and the pull refused. Only then does the copy move into
$TPI_HOME/models/NAME, whole, with the commit it came from.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tpi.paths import models_dir
from tpi.sources.hub_errors import PullError, hub_errors
from tpi.sources.hub_files import HubFile, checkpoint_files, mismatch, shard_files, weights_estimate
from tpi.sources.hub_ref import HubRef
from tpi.storage.file_lock import file_lock

ProgressFn = Callable[[int, int, str], None]
COMPLETE_MARKER = ".tpi-complete"  # the model cache's own (tpi.sources.model_registry)


@dataclass
class Listing:
    """What the hub says about a revision of a repository."""

    ref: HubRef
    commit: str
    files: dict[str, HubFile]
    endpoint: str

    def wanted(self) -> tuple[list[HubFile], bool]:
        """The files to fetch first, and whether an index names more after them."""
        if self.ref.filename is None:
            return checkpoint_files(self.ref.repo, self.files)
        found = self.files.get(self.ref.filename)
        if found is None:
            ggufs = sorted(n for n in self.files if n.endswith(".gguf"))[:5]
            raise PullError(
                f"{self.ref.repo} has no file {self.ref.filename}"
                + (f" (its GGUF files: {', '.join(ggufs)})" if ggufs else "")
            )
        return [found], False

    def download_bytes(self) -> int:
        first, indexed = self.wanted()
        extra = weights_estimate(self.files) if indexed else 0
        return sum(f.size or 0 for f in first) + extra


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def list_revision(ref: HubRef) -> Listing:
    """The commit `ref`'s revision is at and every file in it, with sizes and checksums."""
    from huggingface_hub import HfApi

    with hub_errors(ref, f"GET {endpoint()}/api/models/{ref.repo}"):
        info = HfApi().model_info(ref.repo, revision=ref.revision, files_metadata=True)
    files = {s.rfilename: HubFile.from_sibling(s) for s in info.siblings or []}
    return Listing(ref, info.sha, files, endpoint())


def pull(
    ref: HubRef,
    echo: Callable[[str], None],
    listing: Listing | None = None,
    show_progress: bool = True,
) -> Path:
    """Download `ref` into the cache (resuming an earlier try) and return its copy;
    a copy already at the hub's commit is kept as is."""
    from tpi.progress import ProgressReporter

    listing = listing or list_revision(ref)
    target = ref.cache_dir
    if pulled_commit(target) == listing.commit:
        echo(f"{ref} is up to date (commit {listing.commit[:12]})")
        return target
    staging = models_dir() / ".pulling" / ref.cache_name
    echo(f"Downloading {ref} (commit {listing.commit[:12]}) from {listing.endpoint}...")
    with file_lock(staging.with_name(ref.cache_name + ".lock")):
        with ProgressReporter("downloading") as bar:
            _fetch_all(listing, staging, bar if show_progress else None)
        if ref.filename is not None:
            with ProgressReporter("converting") as bar:
                return _convert_gguf(listing, staging, target, echo, bar if show_progress else None)
        _write_marker(staging, listing)
        _move_into_place(staging, target)
    return target


def _fetch_all(listing: Listing, staging: Path, progress: ProgressFn | None) -> None:
    first, indexed = listing.wanted()
    total = listing.download_bytes()
    counter = _Counter(progress, total, _bytes_on_disk(staging, first))
    for f in first:
        fetch_file(listing, f, staging, counter)
    if indexed:
        shards = shard_files(listing.ref.repo, staging / first[-1].name, listing.files)
        counter.total = sum(f.size or 0 for f in first + shards)
        counter.done += _bytes_on_disk(staging, shards)  # an earlier try's, if any
        for f in shards:
            fetch_file(listing, f, staging, counter)


def _bytes_on_disk(staging: Path, files: list[HubFile]) -> int:
    done = 0
    for f in files:
        for p in (staging / f.name, staging / (f.name + ".part")):
            if p.is_file():
                done += p.stat().st_size
    return done


class _Counter:
    """Bytes fetched so far, for one progress bar over the whole pull."""

    def __init__(self, progress: ProgressFn | None, total: int, done: int) -> None:
        self.progress, self.total, self.done = progress, total, done

    def add(self, n: int, name: str) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(min(self.done, self.total), max(self.total, 1), name)


class _CountingFile:
    """The .part file as the client writes it, counting the bytes it adds."""

    def __init__(self, f, counter: _Counter, name: str) -> None:
        self._f, self._counter, self._name = f, counter, name

    def write(self, data: bytes) -> int:
        n = self._f.write(data)
        self._counter.add(len(data), self._name)
        return n

    def __getattr__(self, attr: str):  # seek, tell, truncate, flush: the file's own
        return getattr(self._f, attr)


def fetch_file(listing: Listing, f: HubFile, staging: Path, counter: _Counter) -> Path:
    """One file, whole and checked, in `staging` (resumed from its .part)."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers, disable_progress_bars

    final = staging / f.name
    if final.is_file():
        return final  # checked when it was finished
    part = staging / (f.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.is_file() else 0
    if f.size is not None and have > f.size:
        counter.add(-have, f.name)
        have = 0  # not a prefix of this file: start over
    url = hf_hub_url(listing.ref.repo, f.name, revision=listing.commit)
    disable_progress_bars("huggingface_hub.http_get")  # ours counts the whole pull
    # The client resumes a dropped connection by itself and says so in several lines
    # of warnings; a failure that remains comes back as one line (hub_errors).
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    with open(part, "r+b" if have else "wb") as raw, hub_errors(listing.ref, f"GET {url}"):
        raw.truncate(have)
        raw.seek(have)
        http_get(
            url,
            _CountingFile(raw, counter, f.name),
            resume_size=have,
            headers=build_hf_headers(),
            expected_size=f.size,
            displayed_filename=f.name,
        )
    wrong = mismatch(part, f)
    if wrong is not None:
        part.unlink()
        raise PullError(
            f"refused {f.name} of {listing.ref}: {wrong}; the download was deleted "
            f"(pull again; if it repeats, the copy at {listing.endpoint} is damaged)"
        )
    part.rename(final)
    return final


def _write_marker(directory: Path, listing: Listing) -> None:
    meta = {
        "source": "hub",
        "name": str(listing.ref),
        "repo": listing.ref.repo,
        "revision": listing.ref.revision,
        "commit": listing.commit,
        "endpoint": listing.endpoint,
    }
    (directory / COMPLETE_MARKER).write_text(json.dumps(meta) + "\n")


def pulled_commit(directory: Path) -> str | None:
    """The commit a complete pulled copy came from (None: none there)."""
    try:
        meta = json.loads((directory / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return meta.get("commit") if isinstance(meta, dict) else None


def _move_into_place(staging: Path, target: Path) -> None:
    """`staging` becomes `target` in one rename; an older copy there is removed after."""
    old = None
    if target.exists():
        old = staging.with_name(staging.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _convert_gguf(
    listing: Listing,
    staging: Path,
    target: Path,
    echo: Callable[[str], None],
    progress: ProgressFn | None,
) -> Path:
    from tpi.sources.model_registry import ensure_converted

    gguf = staging / listing.ref.filename
    if target.exists():
        shutil.rmtree(target)  # an older commit's conversion
    ensure_converted(gguf, target, echo, progress)
    _write_marker(target, listing)
    shutil.rmtree(staging)  # the conversion is what is kept; the GGUF can be pulled again
    return target
