"""Fetch the official pre-tokenised FineWeb shards from the Hugging Face Hub (SPEC §2.4).

Mirrors `data/cached_challenge_fineweb.py`: the repo's `manifest.json` says how many shards each
variant has and which tokenizer files belong to it; files come from `hf_hub_download` and are
hard-linked (or copied) out of the HF cache. The result is a pgolf dataset directory: official shard
names, `tokenizer.model` and `meta.json`, with the HF cache kept inside it under `.cache/`.

Re-running is cheap: files already in place that validate are skipped, and nothing appears under a
final name before it has been validated.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
)
from tqdm import tqdm

from pgolf.data.shards import read_header, shard_name
from pgolf.data.tokenizer import file_sha256, load_tokenizer
from pgolf.errors import PgolfError
from pgolf.fileio import writable_dir, write_text_atomic

# SPEC §2.4: sp1024 lives in the official repo; the larger vocabularies were published separately.
VARIANT_REPOS = {
    "sp1024": "willdepueoai/parameter-golf",
    "sp4096": "kevclark/parameter-golf",
    "sp8192": "kevclark/parameter-golf",
}
DEFAULT_REMOTE_ROOT = "datasets"
REPO_ENV = "MATCHED_FINEWEB_REPO_ID"
REMOTE_ROOT_ENV = "MATCHED_FINEWEB_REMOTE_ROOT_PREFIX"
TOKENIZER_FILE = "tokenizer.model"
META_FILE = "meta.json"
CACHE_DIR = ".cache"

try:  # huggingface_hub 2.x talks HTTP through httpx2, 1.x through httpx
    from httpx2 import TransportError as _TransportError
except ImportError:
    from httpx import TransportError as _TransportError


@dataclass(frozen=True)
class _Item:
    """One file to fetch: where it lives in the repo, its name in OUT, and how to check it."""

    remote: str
    name: str
    kind: str  # "shard" | "model" | "vocab"


def fetch_dataset(
    variant: str,
    out_dir: str | os.PathLike,
    train_shards: int | None = None,
    repo_id: str | None = None,
    remote_root: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Download one official dataset variant into `out_dir`; return a summary of what was done.

    `train_shards` limits the train split to its first N shards (default: all the manifest lists);
    the val split is always fetched whole. `repo_id` and `remote_root` default to the upstream
    environment overrides (MATCHED_FINEWEB_REPO_ID, MATCHED_FINEWEB_REMOTE_ROOT_PREFIX), then to the
    variant's repo and "datasets". HF_ENDPOINT is read at call time, so a mirror set after import
    still applies.
    """
    if variant not in VARIANT_REPOS:
        raise PgolfError(f"--variant {variant!r} is not one of {', '.join(sorted(VARIANT_REPOS))}")
    if train_shards is not None and train_shards < 0:
        raise PgolfError(f"--train-shards must be >= 0, got {train_shards}")
    repo_id = repo_id or os.environ.get(REPO_ENV) or VARIANT_REPOS[variant]
    if remote_root is None:
        remote_root = os.environ.get(REMOTE_ROOT_ENV, DEFAULT_REMOTE_ROOT)
    remote_root = remote_root.strip("/")
    out = Path(out_dir)
    vocab_size = int(variant.removeprefix("sp"))
    dataset = f"fineweb10B_{variant}"

    if out.exists() and not out.is_dir():
        raise PgolfError(f"--out {out}: exists and is not a directory")
    _refuse_other_dataset(out, variant, repo_id)
    writable_dir(out, "--out")
    show = progress and sys.stderr.isatty()
    hub = _Hub(repo_id, out / CACHE_DIR, _FileBar if show else _QuietBar)

    with _xet_cache_inside(out / CACHE_DIR):
        manifest_remote = _join(remote_root, "manifest.json")
        manifest = _Manifest(hub.download(manifest_remote), f"{repo_id}:{manifest_remote}")
        layout = manifest.layout(dataset)
        available = layout["files_train"]
        n_train = available if train_shards is None else train_shards
        if n_train > available:
            raise PgolfError(
                f"--train-shards {n_train}: {repo_id} has only {available} {dataset} train shards"
            )

        # Tokenizer files keep their original names (e.g. fineweb_1024_bpe.model) beside the copy.
        tokenizer_files = {"model": layout["model"], "vocab": layout["vocab"]}
        items = [
            _Item(_join(remote_root, path), PurePosixPath(path).name, kind)
            for kind, path in tokenizer_files.items()
            if path
        ]
        shard_dir = _join(remote_root, "datasets", dataset)
        for split, count in (("val", layout["files_val"]), ("train", n_train)):
            for i in range(count):
                name = shard_name(split, i)
                items.append(_Item(f"{shard_dir}/{name}", name, "shard"))

        base = dict(variant=variant, repo_id=repo_id, remote_root=remote_root, dataset=dataset)
        # Written before any download so an interrupted run still claims the directory (see
        # _refuse_other_dataset): shards of different vocabularies share file names.
        _write_meta(out, {**base, "complete": False})
        _sweep_stale_temps(out, [item.name for item in items] + [TOKENIZER_FILE])

        fetched, skipped = [], []
        bar = tqdm(items, desc=f"fetch {variant}", unit="file", disable=not show)
        for item in bar:
            bar.set_postfix_str(item.name, refresh=False)
            if _is_valid(out / item.name, item.kind, vocab_size):
                skipped.append(item.name)
                continue
            _fetch_one(hub, item, out, vocab_size)
            fetched.append(item.name)
        bar.close()

    model_name = items[0].name
    _install_copy(out / model_name, out / TOKENIZER_FILE)
    tokens = {item.name: read_header(out / item.name) for item in items if item.kind == "shard"}
    summary = {
        **base,
        "out_dir": str(out),
        "fetched": fetched,
        "skipped": skipped,
        "train_shards": n_train,
        "train_shards_available": available,
        "val_shards": layout["files_val"],
        "train_tokens": sum(t for n, t in tokens.items() if n.startswith("fineweb_train_")),
        "val_tokens": sum(t for n, t in tokens.items() if n.startswith("fineweb_val_")),
        "tokenizer": TOKENIZER_FILE,
        "tokenizer_sha256": file_sha256(out / TOKENIZER_FILE),
    }
    files = []
    for item in items:
        entry = {
            "name": item.name,
            "source": item.remote,
            "bytes": (out / item.name).stat().st_size,
        }
        if item.name in tokens:
            entry["tokens"] = tokens[item.name]
        files.append(entry)
    counts = ("train_shards", "train_shards_available", "val_shards", "train_tokens", "val_tokens")
    tokenizer = {
        "file": TOKENIZER_FILE,
        "original_name": model_name,
        "name": layout["tokenizer_name"],
        "sha256": summary["tokenizer_sha256"],
    }
    meta = {**base, "complete": True, **{k: summary[k] for k in counts}}
    _write_meta(out, {**meta, "tokenizer": tokenizer, "files": files})
    return summary


class _Hub:
    """`hf_hub_download` for one dataset repo, with its errors turned into one-line PgolfErrors."""

    def __init__(self, repo_id: str, cache_dir: Path, bar_class: type[tqdm]):
        self.repo_id = repo_id
        self.cache_dir = cache_dir
        self.bar_class = bar_class
        # Read here, not at import: huggingface_hub freezes HF_ENDPOINT when it is imported.
        self.endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or None

    def download(self, remote: str) -> Path:
        where = f"{self.repo_id}:{remote}"
        endpoint = self.endpoint or hf_constants.ENDPOINT
        try:
            path = hf_hub_download(
                repo_id=self.repo_id,
                filename=remote,
                repo_type="dataset",
                cache_dir=self.cache_dir,
                endpoint=self.endpoint,
                tqdm_class=self.bar_class,
            )
            # The snapshot entry is a symlink into blobs/ (for Xet repos perhaps on into a shared
            # store): hand out the real file, so OUT never holds a link that breaks with the cache.
            return Path(path).resolve(strict=True)
        except RemoteEntryNotFoundError:
            raise PgolfError(f"{where}: no such file in the dataset repo") from None
        except RepositoryNotFoundError:
            raise PgolfError(
                f"{self.repo_id}: no such dataset repo at {endpoint} (or it is private or gated)"
            ) from None
        except LocalEntryNotFoundError as exc:
            # Raised when the Hub could not be asked at all; the reason is the chained error.
            raise PgolfError(
                f"{where}: cannot download from {endpoint} and no cached copy "
                f"({_one_line(exc.__cause__ or exc)})"
            ) from None
        except (HfHubHTTPError, OSError, _TransportError) as exc:
            # Network drops and full disks: the run can simply be repeated and resumes.
            raise PgolfError(f"{where}: download failed ({_one_line(exc)})") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if text else type(exc).__name__


class _Manifest:
    """The parts of the upstream manifest that fetching needs, with precise complaints."""

    def __init__(self, path: Path, label: str):
        self.label = label
        try:
            self.data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise PgolfError(f"{label}: cannot parse manifest: not UTF-8 text") from None
        except json.JSONDecodeError as exc:
            raise PgolfError(
                f"{label}: cannot parse manifest: {exc.msg} at line {exc.lineno} column {exc.colno}"
            ) from None
        if not isinstance(self.data, dict):
            raise PgolfError(f"{label}: cannot parse manifest: top level is not a JSON object")

    def _missing(self, key: str) -> PgolfError:
        return PgolfError(f"{self.label}: manifest lacks {key}")

    def _entry(self, section: str, name: str) -> dict:
        entries = self.data.get(section)
        if not isinstance(entries, list):
            raise self._missing(f"'{section}' (a list of entries)")
        for entry in entries:
            if isinstance(entry, dict) and entry.get("name") == name:
                return entry
        names = [e.get("name") for e in entries if isinstance(e, dict)]
        raise self._missing(f"{section}[name={name!r}] (it lists: {', '.join(map(str, names))})")

    def _count(self, stats: dict, key: str, where: str) -> int:
        value = stats.get(key)
        # JSON has no int type of its own: accept 3, 3.0 and "3", refuse true, -1 and "three".
        with contextlib.suppress(TypeError, ValueError):
            if not isinstance(value, bool) and float(value) == int(value) >= 0:
                return int(value)
        if value is None:
            raise self._missing(f"{where}.stats.{key}")
        raise PgolfError(f"{self.label}: {where}.stats.{key} = {value!r} is not a shard count")

    def _path(self, value: Any, key: str) -> str:
        path = PurePosixPath(str(value))
        # Paths are relative to the remote root; refuse anything that could escape it.
        if path.is_absolute() or ".." in path.parts or not path.name:
            raise PgolfError(f"{self.label}: {key} = {value!r} is not a path inside the repo")
        return path.as_posix()

    def layout(self, dataset: str) -> dict[str, Any]:
        where = f"datasets[name={dataset!r}]"
        entry = self._entry("datasets", dataset)
        stats = entry.get("stats")
        if not isinstance(stats, dict):
            raise self._missing(f"{where}.stats")
        files_train = self._count(stats, "files_train", where)
        files_val = self._count(stats, "files_val", where)
        if files_val == 0:
            raise PgolfError(f"{self.label}: {where}.stats.files_val is 0; a val split is required")
        tokenizer_name = entry.get("tokenizer_name")
        if not tokenizer_name:
            raise self._missing(f"{where}.tokenizer_name")
        tok = self._entry("tokenizers", tokenizer_name)
        tok_where = f"tokenizers[name={tokenizer_name!r}]"
        # The exporter writes model_path/vocab_path for SentencePiece, a single `path` otherwise.
        model_key = "model_path" if tok.get("model_path") else "path" if tok.get("path") else None
        if model_key is None:
            raise self._missing(f"{tok_where}.model_path (or .path)")
        vocab = tok.get("vocab_path")
        return {
            "files_train": files_train,
            "files_val": files_val,
            "tokenizer_name": tokenizer_name,
            "model": self._path(tok[model_key], f"{tok_where}.{model_key}"),
            "vocab": self._path(vocab, f"{tok_where}.vocab_path") if vocab else None,
        }


def _fetch_one(hub: _Hub, item: _Item, out: Path, vocab_size: int) -> None:
    """Download one file, validate it, and only then give it its final name in `out`."""
    source = hub.download(item.remote)
    final = out / item.name
    tmp = out / f".{item.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        _link_or_copy(source, tmp)
        try:
            _validate(tmp, item.kind, vocab_size)
        except PgolfError as exc:
            _forget_cached(source)
            reason = str(exc).removeprefix(f"{tmp}: ")
            raise PgolfError(
                f"{hub.repo_id}:{item.remote}: bad download, not saved as {final}: {reason}"
            ) from None
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def _validate(path: Path, kind: str, vocab_size: int) -> None:
    if kind == "shard":
        read_header(path)
    elif kind == "model":
        vocab = load_tokenizer(path).vocab_size()
        if vocab != vocab_size:
            raise PgolfError(f"{path}: tokenizer has {vocab} pieces, expected {vocab_size}")
    elif path.stat().st_size == 0:
        raise PgolfError(f"{path}: empty vocab file")


def _is_valid(path: Path, kind: str, vocab_size: int) -> bool:
    if not path.is_file():
        return False
    try:
        _validate(path, kind, vocab_size)
    except PgolfError:
        return False
    return True


def _link_or_copy(source: Path, dest: Path) -> None:
    # A hard link costs no space (shards total gigabytes); copy where links are not supported.
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)


def _install_copy(source: Path, dest: Path) -> None:
    if dest.is_file() and file_sha256(dest) == file_sha256(source):
        return
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _forget_cached(blob: Path) -> None:
    """Drop a bad blob from the HF cache so the next run downloads it again instead of reusing it.

    The snapshot symlinks that pointed at it dangle afterwards, which huggingface_hub treats as
    "not cached".
    """
    with contextlib.suppress(OSError):
        blob.unlink()


def _sweep_stale_temps(out: Path, names: list[str]) -> None:
    """Remove temp files a killed run left behind (only ours: `.<final name>.<id>.tmp`)."""
    for name in names:
        for stale in out.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)


def _refuse_other_dataset(out: Path, variant: str, repo_id: str) -> None:
    # Every variant names its shards fineweb_{split}_NNNNNN.bin: resuming into a directory that
    # holds another vocabulary's shards would silently mix them.
    meta_path = out / META_FILE
    if not meta_path.is_file():
        return
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        held = (meta["variant"], meta["repo_id"])
    except (ValueError, KeyError, TypeError):
        raise PgolfError(f"{meta_path}: unreadable; not a directory made by pgolf fetch?") from None
    if held != (variant, repo_id):
        raise PgolfError(
            f"{out}: already holds {held[0]} from {held[1]}; fetch {variant} from {repo_id} "
            "into another directory"
        )


def _write_meta(out: Path, meta: dict) -> None:
    write_text_atomic(out / META_FILE, json.dumps(meta, indent=2) + "\n")


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


@contextlib.contextmanager
def _xet_cache_inside(cache_dir: Path) -> Iterator[None]:
    """Point hf_xet's chunk cache into OUT/.cache unless the user chose a place for it.

    Xet-backed repos download through hf_xet, which otherwise caches chunks under
    ~/.cache/huggingface/xet. huggingface_hub starts the hf_xet session lazily, at the first Xet
    download, so the setting is in time unless this process already downloaded from Xet before.
    """
    if "HF_XET_CACHE" in os.environ:
        yield
        return
    os.environ["HF_XET_CACHE"] = str((cache_dir / "xet").resolve())
    try:
        yield
    finally:
        os.environ.pop("HF_XET_CACHE", None)


class _FileBar(tqdm):
    """Per-file byte bar under the files bar; cleared when its file is done."""

    def __init__(self, *args, **kwargs):
        kwargs["leave"] = False
        super().__init__(*args, **kwargs)


class _QuietBar(tqdm):
    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)
