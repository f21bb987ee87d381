"""Turn `labram prep` inputs (files, folders, glob patterns) into a sorted list of recordings.

A folder (or a glob match) is searched recursively for the extensions in `SCAN_EXTENSIONS`. Everything else in it
is listed too, as skipped with the reason, so that the report accounts for every file: sidecars (.vmrk, .fdt, a
BrainVision .eeg), other extensions (.json, .tsv, .txt), hidden files (`.x`, and macOS's `._x.edf` copies, which
carry an EEG extension but no EEG) and hidden folders (one entry each, not searched). A file named explicitly is
always tried, whatever its extension, so a wrong one is rejected in the report rather than ignored.

Each recording gets an id, its path relative to the input that found it (POSIX separators), and a dataset name,
by default the name of that input's folder; the list is sorted by (dataset, id) so the job's order, and with it
the shard contents, do not depend on the order of the inputs or of the file system.
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from labram_jax.errors import UserError
from labram_jax.files import not_regular

# What MNE's read_raw reads and a folder scan picks up. Left out on purpose: extensions that in an EEG corpus are
# mostly something else (.txt, .dat, .mat, .bin, .asc, .hdr: notes, BrainVision data, MATLAB, eye tracking, fNIRS),
# MEG-only formats (.ds, .sqd, .con) and fNIRS (.snirf); Curry's .rs3/.cef/.cdt.* describe the same recording as its
# .dap/.cdt. Name such files explicitly to have them read.
SCAN_EXTENSIONS: tuple[str, ...] = (
    ".edf", ".bdf", ".gdf", ".vhdr", ".ahdr", ".set", ".cnt", ".fif", ".fif.gz", ".mff", ".eeg", ".nxe", ".data",
    ".cdt", ".dap", ".nedf", ".lay", ".mefd", ".xdf", ".xdfz",
)
# Formats stored as a folder: a folder with one of these names is a recording, not a place to search.
FOLDER_FORMATS: tuple[str, ...] = (".mff", ".mefd", ".ds")
_BRAINVISION_HEADERS = (".vhdr", ".ahdr")
_SIDECAR_KEY = re.compile(r"^\s*(DataFile|MarkerFile)\s*=\s*(.+?)\s*$", re.IGNORECASE)


class DiscoveryError(UserError):
    """Inputs that name nothing, or two different recordings under one id: a usage error."""


@dataclass(frozen=True)
class Source:
    """One input of the job."""

    path: str  # as found (relative paths stay relative), for reading and for the report
    recording: str  # id: path relative to the input that found it
    dataset: str
    skip: str = ""  # why it is listed but not read (a sidecar, another format, a hidden name)

    @property
    def stem(self) -> str:
        name = Path(self.recording).name
        return name[:-len(_extension(name))] if _extension(name) else Path(name).stem


def _extension(name: str) -> str:
    lower = name.lower()
    return next((ext for ext in SCAN_EXTENSIONS + FOLDER_FORMATS if lower.endswith(ext)), "")


def _is_recording_name(name: str) -> bool:
    return not name.startswith(".") and _extension(name) in SCAN_EXTENSIONS


def brainvision_sidecars(header: Path) -> dict[str, str]:
    """{file name: role} of the data and marker files a BrainVision header names."""
    if not_a_file(header):
        return {}
    try:
        text = header.read_text(encoding="latin-1")
    except OSError:
        return {}
    sidecars = {}
    for line in text.splitlines():
        match = _SIDECAR_KEY.match(line)
        if match:
            sidecars[match[2]] = match[1].lower().replace("file", " file")
    return sidecars


class _Sidecars:
    """Which files of a folder hold another file's samples or markers (BrainVision .eeg/.dat/.vmrk named by a
    .vhdr, EEGLAB .fdt beside its .set). Each folder is read once per discover() call, so a folder of ten thousand
    recordings named one by one costs one listing, not ten thousand."""

    def __init__(self) -> None:
        self._folders: dict[Path, dict[str, str]] = {}

    def of(self, folder: Path, names: Iterable[str] | None = None) -> dict[str, str]:
        """{file name: why it is not a recording of its own}."""
        if folder not in self._folders:
            owners: dict[str, str] = {}
            for name in sorted(os.listdir(folder) if names is None else names):
                suffix = Path(name).suffix
                if suffix.lower() in _BRAINVISION_HEADERS:
                    for sidecar, role in brainvision_sidecars(folder / name).items():
                        owners.setdefault(sidecar, f"{role} of {name} (BrainVision); name the {suffix} to read the "
                                                   "recording")
                elif suffix.lower() == ".set":
                    owners.setdefault(Path(name).stem + ".fdt",
                                      f"data file of {name} (EEGLAB); name the .set to read the recording")
            self._folders[folder] = owners
        return self._folders[folder]

    def owner(self, path: Path) -> str:
        return self.of(path.parent).get(path.name, "")


def not_a_file(path: Path) -> str:
    """Why `path` (a link: its target) is neither a regular file nor a folder, which opening would block on or
    stream from (a FIFO, a socket, a device); "" for files, folders, and what does not exist."""
    kind = not_regular(path, folders=True)
    return f"not a regular file ({kind}): never opened" if kind else ""


def _not_read(path: Path, sidecars: _Sidecars) -> str:
    """Why a folder scan does not read this file."""
    if special := not_a_file(path):
        return special
    if path.name.startswith("."):
        return "hidden file"
    return sidecars.owner(path) or (f"not a recording format read from a folder ({_suffixes(path.name)}); name "
                                    "the file as an INPUT to have it tried")


def _suffixes(name: str) -> str:
    return "".join(Path(name).suffixes[-2:]) or "no extension"


def _scan(root: Path, sidecars: _Sidecars) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Recordings under a folder, recursively (folder formats are taken whole), and what is not read, with why."""
    found, skipped = [], []
    for folder, subfolders, files in os.walk(root):
        here = Path(folder)
        skipped += [(here / d, "hidden folder, not searched") for d in sorted(subfolders) if d.startswith(".")]
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        # A folder format is one recording: a scan takes .mff/.mefd whole and never searches inside any of them.
        found += [here / d for d in subfolders if _is_recording_name(d) and _extension(d) in FOLDER_FORMATS]
        subfolders[:] = [d for d in subfolders if _extension(d) not in FOLDER_FORMATS]
        owned = sidecars.of(here, files + subfolders)
        for f in sorted(files):
            if _is_recording_name(f) and f not in owned and not not_a_file(here / f):
                found.append(here / f)
            else:
                skipped.append((here / f, _not_read(here / f, sidecars)))
    return found, skipped


def _glob_base(pattern: str) -> Path:
    """The leading part of a pattern without wildcards: what a match's id is relative to."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _folder_name(folder: Path) -> str:
    return Path(os.path.abspath(folder)).name


def _sources(item: str, dataset: str | None, sidecars: _Sidecars) -> Iterable[Source]:
    path = Path(item)
    if glob.has_magic(item):
        base = _glob_base(item)
        # pathlib's ** does not follow links into folders (glob's does, so a link to "." never ends); hidden names
        # match only a pattern that names them, as with glob.
        rest = Path(item).relative_to(base)
        hidden = any(part.startswith(".") for part in rest.parts)
        matches = sorted(m for m in base.glob(rest.as_posix())
                         if hidden or not any(p.startswith(".") for p in m.relative_to(base).parts))
        if not matches:
            raise DiscoveryError(f"{item}: matches nothing")
        name = dataset or _folder_name(base)
        for match in map(Path, matches):
            if match.is_dir() and _extension(match.name) not in FOLDER_FORMATS:
                found, skipped = _scan(match, sidecars)
            elif _is_recording_name(match.name) and not sidecars.owner(match) and not not_a_file(match):
                found, skipped = [match], []
            else:
                found, skipped = [], [(match, _not_read(match, sidecars))]
            yield from (Source(str(f), f.relative_to(base).as_posix(), name) for f in found)
            yield from (Source(str(f), f.relative_to(base).as_posix(), name, skip=why) for f, why in skipped)
    elif path.is_dir() and _extension(path.name) not in FOLDER_FORMATS:
        name = dataset or _folder_name(path)
        found, skipped = _scan(path, sidecars)
        yield from (Source(str(f), f.relative_to(path).as_posix(), name) for f in found)
        yield from (Source(str(f), f.relative_to(path).as_posix(), name, skip=why) for f, why in skipped)
    elif path.exists():
        yield Source(str(path), path.name, dataset or _folder_name(path.parent),
                     skip=not_a_file(path) or (sidecars.owner(path) if path.is_file() else ""))
    else:
        raise DiscoveryError(f"{item}: no such file or directory")


def discover(inputs: Sequence[str | os.PathLike], dataset: str | None = None) -> list[Source]:
    """Every recording the inputs name, once, and every other file found in their folders (skipped, with the
    reason), sorted by (dataset, id).

    Raises DiscoveryError when an input does not exist or matches nothing, when the inputs hold no recording, and
    when two different files would get the same dataset and id (their windows could not be told apart).
    """
    if isinstance(inputs, str):
        raise TypeError("inputs must be a sequence of paths or patterns, not a str")
    by_file: dict[str, Source] = {}
    sidecars = _Sidecars()
    for item in inputs:
        for source in _sources(os.fspath(item), dataset, sidecars):
            key = os.path.realpath(source.path)
            kept = by_file.get(key)
            # The same file reached twice (a folder and a file in it): keep one, the same one whatever the order,
            # and one that is read over one that is not (a .txt in a folder, and named on its own).
            if kept is None or (bool(source.skip), source.dataset, source.recording) < (
                    bool(kept.skip), kept.dataset, kept.recording):
                by_file[key] = source
    # Folders holding nothing but other files are a mistake; a file named on its own is always listed.
    if not any(not s.skip for s in by_file.values()) and not any(Path(item).is_file() for item in inputs):
        raise DiscoveryError(f"no EEG recordings found in {', '.join(inputs) or 'no inputs'} (looked for "
                             f"{' '.join(SCAN_EXTENSIONS)})")
    sources = sorted(by_file.values(), key=lambda s: (s.dataset, s.recording, s.path))
    clashes = [f"{a.path} and {b.path}" for a, b in zip(sources, sources[1:])
               if (a.dataset, a.recording) == (b.dataset, b.recording)]
    if clashes:
        raise DiscoveryError(f"different recordings with the same dataset and id: {'; '.join(clashes[:5])}; give "
                             "their parent folders as inputs so their ids differ")
    return sources
