"""Where the voice library's objects live: a local (or NFS-mounted) folder, or any fsspec URL
(s3://, gs://, memory://, ...). Both hold flat named objects and replace one only as a whole, so a
reader sees the old object or the new one, never half of one, and two writers of the same voice
leave one whole entry (the last one to finish)."""

from __future__ import annotations

import os
from pathlib import Path

from edge_runtime.paths import atomic_write


def is_url(location: str) -> bool:
    """`proto://...` other than file:// names a remote store; anything else is a folder."""
    return "://" in location and not location.startswith("file://")


class FolderStorage:
    """Objects as files in one folder. Writes go to a hidden temporary file, are fsynced, then
    renamed over the target: rename is atomic on local file systems and on NFS."""

    def __init__(self, root: str | os.PathLike) -> None:
        text = str(root)
        self.root = Path(text[len("file://"):] if text.startswith("file://") else text).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self.location = str(self.root)

    def read(self, name: str, length: int | None = None, offset: int = 0) -> bytes | None:
        """The object's bytes (`length` bytes from `offset` when given); None when it is absent."""
        try:
            with open(self.root / name, "rb") as fh:
                fh.seek(offset)
                return fh.read() if length is None else fh.read(length)
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        atomic_write(self.root / name, lambda tmp: Path(tmp).write_bytes(data))

    def exists(self, name: str) -> bool:
        return (self.root / name).is_file()

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_file() and not p.name.startswith("."))

    def delete(self, name: str) -> bool:
        path = self.root / name
        existed = path.is_file()
        path.unlink(missing_ok=True)
        return existed


class FsspecStorage:
    """Objects under an fsspec URL. An object store writes each object with one PUT, which it makes
    visible whole or not at all; that is the whole-object guarantee the library needs."""

    def __init__(self, url: str) -> None:
        try:
            import fsspec
        except ImportError:  # pragma: no cover - fsspec comes with huggingface_hub
            raise ValueError(f"voice library {url!r} needs the fsspec package") from None
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as exc:  # an unknown protocol, s3:// without s3fs installed
            raise ValueError(str(exc)) from None
        self.root = self.root.rstrip("/")
        self.location = url
        self.fs.makedirs(self.root, exist_ok=True)

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def read(self, name: str, length: int | None = None, offset: int = 0) -> bytes | None:
        try:
            end = None if length is None else offset + length
            return self.fs.cat_file(self._path(name), start=offset or None, end=end)
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(name), data)

    def exists(self, name: str) -> bool:
        path = self._path(name)
        self.fs.invalidate_cache(path)  # a cached listing predates what other replicas wrote since
        return bool(self.fs.isfile(path))

    def names(self) -> list[str]:
        self.fs.invalidate_cache(self.root)  # other replicas write here: never trust a cached listing
        names = [entry.rsplit("/", 1)[-1] for entry in self.fs.ls(self.root, detail=False)]
        return sorted(n for n in names if n and not n.startswith("."))

    def delete(self, name: str) -> bool:
        try:
            self.fs.rm_file(self._path(name))
            return True
        except FileNotFoundError:
            return False


def open_storage(location: str | os.PathLike) -> FolderStorage | FsspecStorage:
    text = str(location)
    return FsspecStorage(text) if is_url(text) else FolderStorage(text)
