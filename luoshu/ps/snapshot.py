"""Server snapshots on disk: atomic write (temp dir, SHA-256 manifest, rename), verified newest-good restore.

One server's snapshots live in ``<root>/server-<index>-of-<num_servers>/snap-<sequence>/``, each a
directory of ``.npy`` arrays (written and read with ``allow_pickle=False``) and a
``manifest.json`` holding the format version, the server's index and count, a JSON `meta`
object and each file's byte size and SHA-256. A snapshot is written into a hidden temp
directory and renamed into place only once complete, so a crash mid-write leaves no
half snapshot under a real name; the newest `keep` good snapshots are kept. Restoring
walks the snapshots newest first and takes the first whose manifest and every checksum
verify, skipping (and logging) corrupt ones.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from luoshu.core.digest import file_sha256
from luoshu.ps.protocol import SnapshotError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
log = logging.getLogger("luoshu.ps")


def server_dir(root: str | os.PathLike, server_index: int, num_servers: int) -> Path:
    """The directory holding the snapshots of one server of a job with `num_servers` servers."""
    return Path(root) / f"server-{server_index:03d}-of-{num_servers:03d}"


def _sequence(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def list_snapshots(root: str | os.PathLike, server_index: int, num_servers: int) -> list[Path]:
    """The snapshot directories of a server, newest first (not yet verified)."""
    d = server_dir(root, server_index, num_servers)
    if not d.is_dir():
        return []
    snaps = [p for p in d.iterdir() if p.is_dir() and p.name.startswith("snap-") and _sequence(p) >= 0]
    return sorted(snaps, key=_sequence, reverse=True)


def write_snapshot(root: str | os.PathLike, server_index: int, num_servers: int, meta: dict,
                   arrays: dict[str, np.ndarray], keep: int = 2) -> Path:
    """Writes one snapshot atomically and prunes all but the newest `keep`; returns its path."""
    d = server_dir(root, server_index, num_servers)
    try:
        d.mkdir(parents=True, exist_ok=True)
        existing = list_snapshots(root, server_index, num_servers)
        seq = (_sequence(existing[0]) + 1) if existing else 0
        tmp = d / f".tmp-snap-{seq:08d}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        files = {}
        for name, array in arrays.items():
            fname = f"{name}.npy"
            path = tmp / fname
            with open(path, "wb") as f:
                np.save(f, np.ascontiguousarray(array), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            files[fname] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        manifest = {"format": FORMAT_VERSION, "server_index": server_index, "num_servers": num_servers,
                    "sequence": seq, "created_unix": time.time(), "meta": meta, "files": files}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        final = d / f"snap-{seq:08d}"
        os.rename(tmp, final)
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise SnapshotError(f"cannot write a snapshot of server {server_index} under {d}: {exc}") from exc
    for old in list_snapshots(root, server_index, num_servers)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_snapshot(path: str | os.PathLike, server_index: int, num_servers: int) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, arrays) of one snapshot, after verifying its manifest and every checksum."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SnapshotError(f"snapshot {path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise SnapshotError(f"snapshot {path}: expected format {FORMAT_VERSION}, found "
                            f"{manifest.get('format') if isinstance(manifest, dict) else manifest!r}")
    if (manifest.get("server_index"), manifest.get("num_servers")) != (server_index, num_servers):
        raise SnapshotError(f"snapshot {path} belongs to server {manifest.get('server_index')} of "
                            f"{manifest.get('num_servers')}, this is server {server_index} of {num_servers}")
    files, meta = manifest.get("files"), manifest.get("meta")
    if not isinstance(files, dict) or not isinstance(meta, dict):
        raise SnapshotError(f"snapshot {path}: the manifest lacks 'files' or 'meta'")
    arrays = {}
    for fname, info in files.items():
        fpath = path / fname
        if not isinstance(fname, str) or "/" in fname or not fname.endswith(".npy") or not isinstance(info, dict):
            raise SnapshotError(f"snapshot {path}: bad file entry {fname!r}")
        if not fpath.is_file() or fpath.stat().st_size != info.get("bytes"):
            found = fpath.stat().st_size if fpath.is_file() else "missing"
            raise SnapshotError(f"snapshot {path}: {fname} should have {info.get('bytes')} bytes, found {found}")
        if file_sha256(fpath) != info.get("sha256"):
            raise SnapshotError(f"snapshot {path}: {fname} does not match its SHA-256 (corrupt)")
        try:
            arrays[fname[:-4]] = np.load(fpath, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"snapshot {path}: {fname} is not a readable .npy array ({exc})") from None
    return meta, arrays


def snapshot_tag(path: str | os.PathLike) -> str | None:
    """The tag a snapshot was taken under (its manifest's meta["tag"]; not verified), or None."""
    try:
        meta = json.loads((Path(path) / MANIFEST).read_text()).get("meta", {})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    tag = meta.get("tag") if isinstance(meta, dict) else None
    return tag if isinstance(tag, str) else None


def list_tags(root: str | os.PathLike, server_index: int, num_servers: int) -> list[str]:
    """The tags of a server's snapshots, newest first (manifests read, checksums not verified)."""
    tags = (snapshot_tag(p) for p in list_snapshots(root, server_index, num_servers))
    return [t for t in tags if t is not None]


def load_tagged(root: str | os.PathLike, server_index: int, num_servers: int, tag: str):
    """(path, meta, arrays) of the newest snapshot tagged `tag` that verifies, or None."""
    for path in list_snapshots(root, server_index, num_servers):
        if snapshot_tag(path) != tag:
            continue
        try:
            meta, arrays = read_snapshot(path, server_index, num_servers)
        except SnapshotError as exc:
            log.warning("skipping a bad snapshot: %s", exc)
            continue
        return path, meta, arrays
    return None


def load_newest(root: str | os.PathLike, server_index: int, num_servers: int):
    """(path, meta, arrays) of the newest snapshot that verifies, or None where there is none."""
    for path in list_snapshots(root, server_index, num_servers):
        try:
            meta, arrays = read_snapshot(path, server_index, num_servers)
        except SnapshotError as exc:
            log.warning("skipping a bad snapshot: %s", exc)
            continue
        return path, meta, arrays
    return None
