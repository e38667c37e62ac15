"""Fetching the official shards (SPEC §2.4) against a local stand-in for the Hugging Face Hub.

The stand-in answers what huggingface_hub 2.4's `hf_hub_download` asks for:
`HEAD/GET {endpoint}/datasets/{repo}/resolve/{revision}/{path}`. Small files are served directly
with an ETag (git blob sha1) and X-Repo-Commit. Large (LFS) files answer with a 302 to a "CDN" on
another port, carrying X-Linked-Etag / X-Linked-Size / X-Repo-Commit, like the real Hub: the HEAD
stops at the cross-origin redirect and the GET follows it. Both servers bind 127.0.0.1 only.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import huggingface_hub.constants
import numpy as np
import pytest

from pgolf.data.fetch import fetch_dataset
from pgolf.data.shards import read_shard, shard_name, write_shard
from pgolf.errors import PgolfError
from pgolf.settings import shared_data

REPO = "willdepueoai/parameter-golf"
COMMIT = "c0ffee" * 6 + "c0ff"  # any 40 hex digits: the Hub's X-Repo-Commit
DATASET_DIR = "datasets/datasets/fineweb10B_sp1024"
TOKENIZER = shared_data("tokenizers", "fineweb_1024_bpe.model")
SHARD_TOKENS = {"train": [5_000, 4_321], "val": [3_000]}


def official_manifest() -> dict:
    """The shape data/download_hf_docs_and_tokenize.py writes (only the fields that matter here)."""
    return {
        "version": "10B",
        "num_docs": 1234,
        "shard_size": 100_000_000,
        "tokenizers": [
            {
                "name": "sp_bpe_1024",
                "kind": "sentencepiece_bpe",
                "vocab_size": 1024,
                "bos_id": 1,
                "eos_id": 2,
                "model_path": "tokenizers/fineweb_1024_bpe.model",
                "vocab_path": "tokenizers/fineweb_1024_bpe.vocab",
            }
        ],
        "datasets": [
            {
                "name": "fineweb10B_sp1024",
                "tokenizer_name": "sp_bpe_1024",
                "tokenizer_kind": "sentencepiece_bpe",
                "path": "datasets/fineweb10B_sp1024",
                "train_glob": "datasets/fineweb10B_sp1024/fineweb_train_*.bin",
                "val_glob": "datasets/fineweb10B_sp1024/fineweb_val_*.bin",
                "vocab_size": 1024,
                "stats": {
                    "files_train": 2,
                    "files_val": 1,
                    "tokens_train": 9_321,
                    "tokens_val": 3_000,
                },
            }
        ],
    }


class FakeHub:
    """Serves `root` (a directory laid out like the dataset repo) the way the Hub does."""

    LFS_SUFFIXES = (".bin", ".model")

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[tuple[str, str, str]] = []  # (server, method, repo path)
        self._lock = threading.Lock()
        self.hub = self._serve(self._hub_handler())
        self.cdn = self._serve(self._cdn_handler())
        self.endpoint = f"http://127.0.0.1:{self.hub.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self.cdn.server_address[1]}"

    @staticmethod
    def _serve(handler) -> ThreadingHTTPServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        # A short poll keeps shutdown() from waiting the default half second per server.
        threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
        return server

    def close(self) -> None:
        for server in (self.hub, self.cdn):
            server.shutdown()
            server.server_close()

    def record(self, server: str, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((server, method, path))

    def shard_gets(self) -> list[str]:
        return [p for _, m, p in self.requests if m == "GET" and p.endswith(".bin")]

    def _file(self, path: str) -> bytes | None:
        target = (self.root / path).resolve()
        if self.root.resolve() not in target.parents or not target.is_file():
            return None
        return target.read_bytes()

    def _hub_handler(self):
        hub = self
        prefix = f"/datasets/{REPO}/resolve/"

        class Handler(_Quiet):
            def _answer(self, with_body: bool) -> None:
                url = unquote(self.path)
                if not url.startswith(prefix):
                    return self._send(404, {"X-Error-Code": "RepoNotFound"}, b"")
                path = url[len(prefix) :].split("/", 1)[1]  # drop the revision
                hub.record("hub", self.command, path)
                data = hub._file(path)
                if data is None:
                    headers = {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}
                    return self._send(404, headers, b"")
                if path.endswith(FakeHub.LFS_SUFFIXES):
                    sha256 = hashlib.sha256(data).hexdigest()
                    headers = {
                        "Location": f"{hub.cdn_url}/cdn/{sha256}?path={path}",
                        "X-Repo-Commit": COMMIT,
                        "X-Linked-Etag": f'"{sha256}"',
                        "X-Linked-Size": str(len(data)),
                        "ETag": f'"{_git_blob_sha1(b"lfs pointer " + sha256.encode())}"',
                    }
                    return self._send(302, headers, b"")
                headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{_git_blob_sha1(data)}"'}
                self._send(200, headers, data if with_body else b"", len(data))

        return Handler

    def _cdn_handler(self):
        hub = self

        class Handler(_Quiet):
            def _answer(self, with_body: bool) -> None:
                path = unquote(self.path.split("?path=", 1)[1]) if "?path=" in self.path else ""
                hub.record("cdn", self.command, path)
                data = hub._file(path)
                if data is None or not self.path.startswith("/cdn/"):
                    return self._send(404, {}, b"")
                self._send(200, {}, data if with_body else b"", len(data))

        return Handler


class _Quiet(BaseHTTPRequestHandler):
    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def do_GET(self) -> None:
        self._answer(with_body=True)

    def _answer(self, with_body: bool) -> None:
        raise NotImplementedError

    def _send(self, status: int, headers: dict, body: bytes, length: int | None = None) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A dataset repo in the official remote layout (SPEC §2.4)."""
    root = tmp_path / "repo"
    rng = np.random.default_rng(0)
    for split, sizes in SHARD_TOKENS.items():
        for i, n in enumerate(sizes):
            write_shard(root / DATASET_DIR / shard_name(split, i), rng.integers(0, 1024, n))
    tokenizers = root / "datasets" / "tokenizers"
    tokenizers.mkdir(parents=True)
    shutil.copyfile(TOKENIZER, tokenizers / "fineweb_1024_bpe.model")
    shutil.copyfile(TOKENIZER.with_suffix(".vocab"), tokenizers / "fineweb_1024_bpe.vocab")
    write_manifest(root, official_manifest())
    return root


def write_manifest(root: Path, manifest: dict | str) -> None:
    text = manifest if isinstance(manifest, str) else json.dumps(manifest, indent=2)
    (root / "datasets" / "manifest.json").write_text(text, encoding="utf-8")


@pytest.fixture
def hub(repo: Path, monkeypatch: pytest.MonkeyPatch):
    server = FakeHub(repo)
    # Keep huggingface_hub on the local server and away from anything else on the network.
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MATCHED_FINEWEB_REPO_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", raising=False)
    # These are read once when huggingface_hub is imported, so the env alone may be too late.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", True)
    yield server
    server.close()


def final_names(out: Path) -> set[str]:
    return {p.name for p in out.iterdir() if not p.name.startswith(".")}


def test_full_fetch_reproduces_the_served_files(hub: FakeHub, repo: Path, tmp_path: Path):
    out = tmp_path / "out"
    summary = fetch_dataset("sp1024", out, progress=False)

    shards = ["fineweb_val_000000.bin", "fineweb_train_000000.bin", "fineweb_train_000001.bin"]
    for name in shards:
        assert (out / name).read_bytes() == (repo / DATASET_DIR / name).read_bytes()
    served_model = (repo / "datasets/tokenizers/fineweb_1024_bpe.model").read_bytes()
    assert (out / "fineweb_1024_bpe.model").read_bytes() == served_model
    assert (out / "tokenizer.model").read_bytes() == served_model
    assert (out / "fineweb_1024_bpe.vocab").read_bytes() == TOKENIZER.with_suffix(
        ".vocab"
    ).read_bytes()
    assert final_names(out) == {
        *shards,
        "fineweb_1024_bpe.model",
        "fineweb_1024_bpe.vocab",
        "tokenizer.model",
        "meta.json",
    }
    # The HF cache lives inside OUT, not in ~/.cache.
    assert (out / ".cache" / "datasets--willdepueoai--parameter-golf").is_dir()
    # Shards took the Hub's LFS route: HEAD answered by a redirect, bytes fetched from the "CDN".
    assert ("hub", "GET", f"{DATASET_DIR}/fineweb_val_000000.bin") not in hub.requests
    assert ("cdn", "GET", f"{DATASET_DIR}/fineweb_val_000000.bin") in hub.requests

    assert summary["repo_id"] == REPO
    assert summary["skipped"] == []
    assert sorted(summary["fetched"]) == sorted(
        [*shards, "fineweb_1024_bpe.model", "fineweb_1024_bpe.vocab"]
    )
    assert (summary["train_shards"], summary["val_shards"]) == (2, 1)
    assert summary["train_tokens"] == sum(SHARD_TOKENS["train"])
    assert summary["val_tokens"] == sum(SHARD_TOKENS["val"])

    meta = json.loads((out / "meta.json").read_text())
    assert meta["complete"] is True
    assert (meta["variant"], meta["repo_id"]) == ("sp1024", REPO)
    assert meta["tokenizer"]["sha256"] == hashlib.sha256(served_model).hexdigest()
    assert meta["tokenizer"]["original_name"] == "fineweb_1024_bpe.model"
    assert {f["name"] for f in meta["files"]} >= set(shards)


def test_train_shards_fetches_only_the_first_n(hub: FakeHub, tmp_path: Path):
    out = tmp_path / "out"
    summary = fetch_dataset("sp1024", out, train_shards=1, progress=False)

    assert (out / "fineweb_train_000000.bin").is_file()
    assert not (out / "fineweb_train_000001.bin").exists()
    assert not any("fineweb_train_000001" in path for *_, path in hub.requests)
    assert (summary["train_shards"], summary["train_shards_available"]) == (1, 2)
    assert summary["train_tokens"] == SHARD_TOKENS["train"][0]
    assert read_shard(out / "fineweb_train_000000.bin").size == SHARD_TOKENS["train"][0]


def test_rerun_skips_every_valid_file_without_downloading_shards(hub: FakeHub, tmp_path: Path):
    out = tmp_path / "out"
    first = fetch_dataset("sp1024", out, progress=False)
    hub.requests.clear()

    second = fetch_dataset("sp1024", out, progress=False)

    assert second["fetched"] == []
    assert sorted(second["skipped"]) == sorted(first["fetched"])
    assert hub.shard_gets() == []
    # Only the manifest is asked about again (a HEAD; its cached copy is still current).
    assert {path for *_, path in hub.requests} <= {"datasets/manifest.json"}
    assert second["train_tokens"] == first["train_tokens"]


def test_a_corrupt_shard_is_named_and_never_saved(hub: FakeHub, repo: Path, tmp_path: Path):
    bad = repo / DATASET_DIR / "fineweb_train_000001.bin"
    good = bad.read_bytes()
    bad.write_bytes(good[:-2])  # header promises one token more than the body holds
    out = tmp_path / "out"

    with pytest.raises(PgolfError, match="fineweb_train_000001.bin") as info:
        fetch_dataset("sp1024", out, progress=False)

    assert "\n" not in str(info.value)
    assert not (out / "fineweb_train_000001.bin").exists()
    assert not list(out.glob(".fineweb_train_000001.bin*"))  # no temp file left behind
    assert json.loads((out / "meta.json").read_text())["complete"] is False

    # Once the server has the right bytes, a re-run fetches only what is missing.
    bad.write_bytes(good)
    summary = fetch_dataset("sp1024", out, progress=False)
    assert summary["fetched"] == ["fineweb_train_000001.bin"]
    assert (out / "fineweb_train_000001.bin").read_bytes() == good


def test_unknown_variant_is_refused_before_any_request(hub: FakeHub, tmp_path: Path):
    with pytest.raises(PgolfError, match="sp2048"):
        fetch_dataset("sp2048", tmp_path / "out", progress=False)
    assert hub.requests == []


def test_more_train_shards_than_listed_is_refused(hub: FakeHub, tmp_path: Path):
    with pytest.raises(PgolfError, match="only 2"):
        fetch_dataset("sp1024", tmp_path / "out", train_shards=3, progress=False)
    assert hub.shard_gets() == []


@pytest.mark.parametrize(
    "break_manifest, missing",
    [
        (lambda m: m["datasets"][0]["stats"].pop("files_train"), "stats.files_train"),
        (lambda m: m["datasets"][0].pop("tokenizer_name"), "tokenizer_name"),
        (lambda m: m["tokenizers"][0].pop("model_path"), "model_path"),
        (lambda m: m.pop("tokenizers"), "'tokenizers'"),
        (lambda m: m["datasets"][0].update(name="fineweb10B_sp4096"), "fineweb10B_sp1024"),
    ],
)
def test_manifest_lacking_a_needed_key_names_it(
    hub: FakeHub, repo: Path, tmp_path: Path, break_manifest, missing: str
):
    manifest = official_manifest()
    break_manifest(manifest)
    write_manifest(repo, manifest)

    with pytest.raises(PgolfError) as info:
        fetch_dataset("sp1024", tmp_path / "out", progress=False)
    message = str(info.value)
    assert "manifest.json" in message and missing in message
    assert hub.shard_gets() == []


def test_unparseable_manifest_says_so(hub: FakeHub, repo: Path, tmp_path: Path):
    write_manifest(repo, '{"datasets": [')
    with pytest.raises(PgolfError, match=r"manifest\.json: cannot parse manifest"):
        fetch_dataset("sp1024", tmp_path / "out", progress=False)


def test_file_missing_from_the_repo_is_named(hub: FakeHub, repo: Path, tmp_path: Path):
    (repo / DATASET_DIR / "fineweb_val_000000.bin").unlink()
    with pytest.raises(PgolfError, match="fineweb_val_000000.bin"):
        fetch_dataset("sp1024", tmp_path / "out", progress=False)


def test_directory_holding_another_variant_is_refused(hub: FakeHub, tmp_path: Path):
    out = tmp_path / "out"
    fetch_dataset("sp1024", out, train_shards=0, progress=False)
    # sp4096 shards have the same file names: resuming into this directory would mix vocabularies.
    with pytest.raises(PgolfError, match="already holds sp1024"):
        fetch_dataset("sp4096", out, repo_id=REPO, progress=False)


def test_rerun_works_with_the_hub_unreachable(hub: FakeHub, tmp_path: Path):
    out = tmp_path / "out"
    fetch_dataset("sp1024", out, progress=False)
    hub.close()  # the manifest now comes from the cache inside OUT

    summary = fetch_dataset("sp1024", out, progress=False)

    assert summary["fetched"] == [] and len(summary["skipped"]) == 5


def test_upstream_environment_overrides_choose_repo_and_root(
    hub: FakeHub, repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    (repo / "datasets").rename(repo / "mirror")
    monkeypatch.setenv("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "mirror")
    summary = fetch_dataset("sp1024", tmp_path / "out", progress=False)
    assert summary["remote_root"] == "mirror" and summary["val_shards"] == 1

    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", "someone/elsewhere")
    with pytest.raises(PgolfError, match="someone/elsewhere: no such dataset repo"):
        fetch_dataset("sp1024", tmp_path / "out2", progress=False)
