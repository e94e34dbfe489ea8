"""Getting the data folder: MP-20, the MP elemental references and the M3GNet weights.

Everything outside generation (``evaluate``, the hull, novelty, coverage, IPT) reads
three things from the data folder that :func:`settings.data_dir` finds:

* ``mp_20/{train,val,test}.csv.gz``: MP-20, CDVAE's split;
* ``hull/2023-02-07-mp-elemental-reference-entries.json.gz``: the MP elemental references;
* ``models/matgl/M3GNet-MP-2021.2.8-PES/{model.json,model.pt,state.pt}``: the M3GNet weights.

:func:`fetch` downloads what is missing (``crystal-llm data fetch``), :func:`check`
says what a folder holds (``crystal-llm data check``) and :func:`link` points the
package at a copy that is already on disk (``crystal-llm data link``).

What a fetched file is checked against
--------------------------------------
* The elemental references and the M3GNet files are checked against the sha256 of the
  published bytes (:data:`MANIFEST`); a mismatch leaves nothing behind and raises
  :class:`ChecksumError`.  The M3GNet hashes are those of matgl's GitHub files at a
  pinned commit; matgl's own by-name download (the Hugging Face hub in matgl 4), tried
  when GitHub fails, is checked against the same hashes: whether the hub serves the
  same bytes was not verified, and if it does not, that fallback fails loudly.
* MP-20 has no published checksum.  Its source is CDVAE's plain CSVs, converted here to
  ``.csv.gz`` without the index column, so the sha256 of a fetched split is not known in
  advance: :func:`fetch` records the sha256 of the downloaded bytes and of the converted
  file in ``MANIFEST.json`` beside the data, and :func:`check` later verifies the file
  against that record (it detects a file changed since the fetch, not a changed source).
  The MP-20 hashes in :data:`MANIFEST` identify the project's own copy
  (``shared/data/mp_20``), which was rebuilt from public pieces of the same split and
  is therefore not byte-identical to a conversion of CDVAE's files.
"""

from __future__ import annotations

import csv
import datetime
import gzip
import hashlib
import http.client
import inspect
import io
import json
import os
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ase_crystal_llm import __version__, settings
from ase_crystal_llm.io.files import atomic_write, fsync, sha256_file

__all__ = [
    "CHUNK", "ChecksumError", "DataFile", "FileStatus", "M3GNET_DIR", "MANIFEST", "RECORD_NAME", "TIMEOUT",
    "check", "default_dest", "describe_in_use", "fetch", "link", "missing", "read_record", "sha256_of",
]


M3GNET_DIR = f"models/matgl/{settings.M3GNET_NAME}"


RECORD_NAME = "MANIFEST.json"


TIMEOUT = 60  # seconds without data before a download is abandoned


CHUNK = 1 << 20


_CDVAE = "https://raw.githubusercontent.com/txie-93/cdvae/main/data/mp_20"


# materialsvirtuallab/matgl (now materialyzeai/matgl; GitHub redirects), the commit whose
# pretrained_models/ blobs are the copy in shared/data (shared/data/SOURCES.md).
_MATGL = ("https://raw.githubusercontent.com/materialsvirtuallab/matgl/"
          f"e9cde2291acd0b4c4a342428e7dd5e4d596b7bf9/pretrained_models/{settings.M3GNET_NAME}")


# Matbench Discovery's data release: figshare file 40387775 (md5 6e93b6f38d6e27d6c811d3cafb23a070,
# as matbench_discovery's data-files list gives) and the same file in git.
_REFERENCES = (
    "https://figshare.com/ndownloader/files/40387775",
    "https://api.figshare.com/v2/file/download/40387775",
    "https://raw.githubusercontent.com/janosh/matbench-discovery/2c7f9fc42d018711dc2f5df573d225ea6d2d17b2/"
    "data/mp/2023-02-07-mp-elemental-reference-entries.json.gz",
)


@dataclass(frozen=True)
class DataFile:
    """One file of the data folder and where it comes from.

    Attributes
    ----------
    path : str
        Path inside the data folder (``/``-separated).
    urls : tuple of str
        Public sources, tried in order.
    sha256 : str or None
        sha256 of the downloaded bytes; ``None`` when no checksum is published
        (the hash of what was fetched is then recorded in ``MANIFEST.json``).
    known_sha256 : tuple of str
        Other copies of the file as placed that :func:`check` recognises.
    cdvae_csv : bool
        The source is a CDVAE CSV (plain text, leading index column) converted on fetch.
    matgl_model : str or None
        A matgl model name whose by-name download is the last source of this file.
    """

    path: str
    urls: tuple[str, ...]
    sha256: str | None
    known_sha256: tuple[str, ...] = ()
    cdvae_csv: bool = False
    matgl_model: str | None = None


def _mp20(split: str, shared_sha256: str) -> DataFile:
    return DataFile(f"mp_20/{split}.csv.gz", (f"{_CDVAE}/{split}.csv",), None,
                    known_sha256=(shared_sha256,), cdvae_csv=True)


def _m3gnet(name: str, sha256: str) -> DataFile:
    return DataFile(f"{M3GNET_DIR}/{name}", (f"{_MATGL}/{name}",), sha256, matgl_model=settings.M3GNET_NAME)


#: Every file of the data folder.  The MP-20 hashes are those of shared/data/mp_20, which was
#: rebuilt from public pieces of CDVAE's split (shared/data/mp_20/SOURCES.md), not converted from
#: CDVAE's CSVs: they recognise that copy, they cannot check a download.  The other hashes are
#: those of the published files (the same bytes as shared/data/hull and shared/data/models).
MANIFEST: tuple[DataFile, ...] = (
    _mp20("train", "80f69d04c06706c6f3544a130e8ac8a3b1a80df94752d23c5c4f4614415f07f3"),
    _mp20("val", "9362cf7d81cd0f2d4a2cf334dc679f6b531ca5854e0ce49fccb86c9d74748109"),
    _mp20("test", "c03ac6b2487b38af8cb6c01d7d4ae1fbf3939650a730fdbc4717bd583a7edb41"),
    DataFile("hull/2023-02-07-mp-elemental-reference-entries.json.gz", _REFERENCES,
             "9fd6ef848a91c88840a0d1709b5856d0edb4af22095237e59db52f2acd6bbf79"),
    _m3gnet("model.json", "05e7db8676ceb37eb07848aff49c556b188699e1035f3df0cbbf1a2c4959148f"),
    _m3gnet("model.pt", "62678f76fbc5d8997ea1d7f3c4bf086df200102125c802b32b08ce14fbcde25b"),
    _m3gnet("state.pt", "a9aa723705bd1a242ec8749332f137811c4a94e17995a564f8f94a9aca68061b"),
)


OK, MISSING, WRONG, UNVERIFIED = "OK", "missing", "wrong sha256", "unverified"


class ChecksumError(ValueError):
    """A file's sha256 is not the expected one."""


@dataclass(frozen=True)
class FileStatus:
    """What :func:`check` found for one file: ``state`` is OK, missing, wrong sha256 or unverified."""

    path: str
    state: str
    detail: str = ""


def default_dest() -> Path:
    """Where :func:`fetch` puts the data by default: ``settings.cache_dir() / "data"``."""
    return settings.cache_dir() / "data"


sha256_of = sha256_file  # the 0.1 name


def missing(folder: str | os.PathLike) -> list[str]:
    """Paths of :data:`MANIFEST` that ``folder`` lacks."""
    return [entry.path for entry in MANIFEST if not (Path(folder) / entry.path).is_file()]


def fetch(dest: str | os.PathLike | None = None, *, mirror: str | None = None, progress: bool = True) -> Path:
    """Download every file of :data:`MANIFEST` that ``dest`` lacks.

    Each file is written to a temporary name beside its target, checked, then renamed
    into place: an interrupted fetch leaves no partial file under a real name, and a
    re-run downloads only what is still missing.  A file that fails does not stop the
    others; the error is raised at the end.

    Parameters
    ----------
    dest : path, optional
        The data folder to fill (default: :func:`default_dest`, which
        :func:`settings.data_dir` finds when nothing else is configured).
    mirror : str, optional
        Base of a mirror laid out like the data folder, replacing the public sources:
        ``file:///path``, a plain folder path, or an ``http(s)://`` URL.  Mirrored MP-20
        splits are taken as they are (already ``.csv.gz``, no conversion).
    progress : bool
        Show one progress bar per file on stderr.

    Returns
    -------
    Path
        ``dest``.

    Raises
    ------
    ChecksumError
        A downloaded file's sha256 differs from :data:`MANIFEST` (the message names the
        file, the expected and the actual hash; nothing is written for it).
    OSError
        A file could not be downloaded from any source (other files are kept).

    Notes
    -----
    CDVAE's MP-20 splits are plain CSVs with a leading index column; they are rewritten
    as gzip CSVs without it (``settings.mp20_path`` and ``datasets.read_structures``
    read them).  No checksum of CDVAE's files is published, so the sha256 of the
    downloaded bytes and of the converted file is recorded in ``MANIFEST.json``
    instead of checked.  Where :data:`MANIFEST` has a sha256, it is checked on the
    downloaded bytes.
    """
    dest = Path(dest).expanduser() if dest is not None else default_dest()
    dest.mkdir(parents=True, exist_ok=True)
    base = _mirror_base(mirror) if mirror else None
    errors = []
    for entry in MANIFEST:
        target = dest / entry.path
        if target.is_file():
            continue
        try:
            record = _fetch_one(entry, target, base, progress)
        except (OSError, ValueError, http.client.HTTPException) as err:
            errors.append(err)
            continue
        _write_record(dest, entry.path, record)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise OSError(f"{len(errors)} files not fetched into {dest}: "
                      + "; ".join(_one_line(err) for err in errors) + "; run again to fetch the rest")
    return dest


def _mirror_base(mirror: str) -> str:
    if "://" not in mirror:  # a plain folder: its file:// URL
        return Path(mirror).expanduser().resolve().as_uri()
    if urllib.parse.urlsplit(mirror).scheme not in ("file", "http", "https"):
        raise ValueError(f"mirror {mirror!r}: use a folder, file://, http:// or https:// URL")
    return mirror.rstrip("/")


def _sources(entry: DataFile, base: str | None) -> list[str]:
    if base is not None:
        return [f"{base}/{urllib.parse.quote(entry.path)}"]
    return list(entry.urls)


def _fetch_one(entry: DataFile, target: Path, base: str | None, progress: bool) -> dict:
    """Put one file in place; return its record for ``MANIFEST.json``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # A mirror holds the data folder as it is: nothing to convert.
    convert = entry.cdvae_csv and base is None
    expected = None if convert else entry.sha256
    failures = []
    for url in _sources(entry, base):
        try:
            return _place(entry, target, url, expected, convert, progress)
        except ChecksumError:
            raise  # a wrong file is not retried from elsewhere: someone should look at it
        except (OSError, http.client.HTTPException) as err:
            failures.append(f"{url}: {_one_line(err)}")
    if entry.matgl_model and base is None:
        try:
            return _place_from_matgl(entry, target, expected)
        except ChecksumError:
            raise
        except Exception as err:  # matgl and huggingface_hub raise many kinds
            failures.append(f"matgl by-name download of {entry.matgl_model}: {_one_line(err)}")
    raise OSError(f"{entry.path}: not fetched ({'; '.join(failures)})")


def _place(entry: DataFile, target: Path, url: str, expected: str | None, convert: bool, progress: bool) -> dict:
    # Streamed through the hash to a temporary file (not atomic_write, which holds the whole
    # content in memory: the MP-20 training split is ~35 MB of CSV), then renamed.
    tmp = _temporary(target)
    raw = _temporary(target, "download") if convert else tmp
    try:
        downloaded = _download(url, raw, entry.path, progress)
        _verify(entry.path, expected, downloaded, url)
        if convert:
            _cdvae_to_csv_gz(raw, tmp)
        placed = sha256_file(tmp) if convert else downloaded
        os.replace(tmp, target)
    finally:
        for path in {tmp, raw}:
            path.unlink(missing_ok=True)
    return _record(url, downloaded, placed, expected)


def _place_from_matgl(entry: DataFile, target: Path, expected: str | None) -> dict:
    source = _matgl_model_files(entry.matgl_model)[Path(entry.path).name]
    data = Path(source).read_bytes()  # a few MB of weights
    actual = hashlib.sha256(data).hexdigest()
    _verify(entry.path, expected, actual, f"matgl's download of {entry.matgl_model}")
    atomic_write(target, data)
    return _record(f"matgl.load_model({entry.matgl_model!r}): {source}", actual, actual, expected)


def _matgl_model_files(name: str) -> dict[str, Path]:
    """Download a named matgl model into matgl's cache the way ``matgl.load_model(name)`` does.

    ``load_model`` finds a named model's files with ``matgl.utils.io._get_file_paths``
    (matgl 4.x: the Hugging Face hub, ``materialyze/<name>``, cached under
    ``~/.cache/matgl``) and then builds the model; only the files are needed here.
    """
    from matgl.utils import io as matgl_io

    finder = matgl_io._get_file_paths
    # matgl 4 takes the name as a string too, so that "owner/name" is not read as a path.
    kwargs = {"str_path": name} if "str_path" in inspect.signature(finder).parameters else {}
    return {Path(fn).name: Path(path) for fn, path in finder(Path(name), **kwargs).items()}


def _temporary(target: Path, stage: str = "") -> Path:
    # Beside the target, so that the final rename stays on one file system (atomic).
    return target.with_name(f".{target.name}.{os.getpid()}{'.' + stage if stage else ''}.part")


def _open_url(url: str):
    request = urllib.request.Request(url, headers={"User-Agent": f"ase-crystal-llm/{__version__}"})
    return urllib.request.urlopen(request, timeout=TIMEOUT)


def _download(url: str, out: Path, label: str, progress: bool) -> str:
    """Stream ``url`` into ``out``; return the sha256 of the bytes."""
    from tqdm.auto import tqdm

    digest, size = hashlib.sha256(), 0
    with _open_url(url) as response, open(out, "wb") as handle:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        with tqdm(total=total, unit="B", unit_scale=True, desc=label, disable=not progress,
                  file=sys.stderr, leave=False) as bar:
            for block in iter(lambda: response.read(CHUNK), b""):
                handle.write(block)
                digest.update(block)
                size += len(block)
                bar.update(len(block))
        fsync(handle)
    if total is not None and size != total:
        raise OSError(f"incomplete download: {size} of {total} bytes")
    return digest.hexdigest()


def _verify(path: str, expected: str | None, actual: str, source: str) -> None:
    if expected is not None and actual != expected:
        raise ChecksumError(f"{path}: sha256 mismatch: expected {expected}, got {actual} "
                            f"(from {source}); nothing was written")


def _cdvae_to_csv_gz(src: Path, out: Path) -> None:
    """Rewrite a CDVAE CSV as the gzip CSV the package reads: the same rows, no index column.

    The gzip header carries no name or time, so the same download always gives the same bytes.
    """
    csv.field_size_limit(sys.maxsize)  # CIFs are long fields
    with open(src, encoding="utf-8", newline="") as source, open(out, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as packed, \
            io.TextIOWrapper(packed, encoding="utf-8", newline="") as text:
        reader, writer = csv.reader(source), csv.writer(text, lineterminator="\n")
        header = next(reader, None)
        if not header or "cif" not in header:
            raise OSError(f"{src.name}: not an MP-20 CSV (no cif column)")
        # pandas writes its index as a first column with an empty name.
        start = 1 if header[0] in ("", "Unnamed: 0") else 0
        writer.writerow(header[start:])
        for row in reader:
            writer.writerow(row[start:])


def _record(source: str, downloaded: str, placed: str, expected: str | None) -> dict:
    return {
        "sha256": placed,
        "source": source,
        "source_sha256": downloaded,
        "checked": "published sha256" if expected else "no published sha256: recorded at fetch",
        "fetched": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def read_record(folder: str | os.PathLike) -> dict:
    """The per-file records of ``folder/MANIFEST.json`` written by :func:`fetch` (``{}`` if none)."""
    path = Path(folder) / RECORD_NAME
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("files", {})
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{path}: not a data manifest ({_one_line(err)})") from None


def _write_record(folder: Path, path: str, record: dict) -> None:
    files = read_record(folder)
    files[path] = record
    text = json.dumps({"format": 1, "files": dict(sorted(files.items()))}, indent=1) + "\n"
    atomic_write(folder / RECORD_NAME, text)  # after every file, so an interrupted fetch keeps its records


def check(folder: str | os.PathLike) -> list[FileStatus]:
    """Which files of :data:`MANIFEST` ``folder`` holds, and whether their sha256 is right.

    A file is OK when its sha256 is the published one, one of the known copies
    (:attr:`DataFile.known_sha256`) or the one recorded when it was fetched;
    unverified when none of these exists (an MP-20 split from elsewhere); wrong
    otherwise.
    """
    folder = Path(folder)
    records = read_record(folder)
    return [_status(entry, folder / entry.path, records.get(entry.path)) for entry in MANIFEST]


def _status(entry: DataFile, path: Path, record: dict | None) -> FileStatus:
    if not path.is_file():
        return FileStatus(entry.path, MISSING)
    actual = sha256_file(path)
    published = None if entry.cdvae_csv else entry.sha256
    if actual == published:
        return FileStatus(entry.path, OK, "matches the published sha256")
    if actual in entry.known_sha256:
        return FileStatus(entry.path, OK, "matches the project's MP-20 copy in shared/data")
    if record and actual == record.get("sha256"):
        return FileStatus(entry.path, OK, f"as fetched from {record.get('source')} ({record.get('checked')})")
    expected = published or (record or {}).get("sha256")
    if expected:
        return FileStatus(entry.path, WRONG, f"expected {expected}, got {actual}")
    return FileStatus(entry.path, UNVERIFIED, f"no published sha256; sha256 {actual}")


def link(source: str | os.PathLike, dest: str | os.PathLike | None = None) -> Path:
    """Point ``dest`` (a symbolic link) at a data folder already on disk, after checking it.

    Parameters
    ----------
    source : path
        A complete data folder (e.g. a site-wide copy).
    dest : path, optional
        The link to create or replace (default: :func:`default_dest`, which
        :func:`settings.data_dir` finds when nothing else is configured).

    Returns
    -------
    Path
        ``dest``.

    Raises
    ------
    FileNotFoundError
        ``source`` lacks files (all are listed).
    ChecksumError
        A file of ``source`` has the wrong sha256.
    FileExistsError
        ``dest`` exists and is not a symbolic link (e.g. a fetched folder).
    """
    source = Path(source).expanduser().resolve()
    if not source.is_dir():
        raise FileNotFoundError(f"data folder not found: {source}")
    statuses = check(source)
    absent = [s.path for s in statuses if s.state == MISSING]
    if absent:
        raise FileNotFoundError(f"{source} lacks {len(absent)} data files: {', '.join(absent)}")
    wrong = [f"{s.path} ({s.detail})" for s in statuses if s.state == WRONG]
    if wrong:
        raise ChecksumError(f"{source}: wrong sha256: {'; '.join(wrong)}")
    dest = Path(dest).expanduser() if dest is not None else default_dest()
    if dest.exists() and not dest.is_symlink():
        raise FileExistsError(f"{dest} exists and is not a link: remove it or choose another destination")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(dest)
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(source, target_is_directory=True)
    os.replace(tmp, dest)  # replaces an older link in one step
    return dest


def describe_in_use(dest: str | os.PathLike | None = None) -> str:
    """The data folder and M3GNet weights that :mod:`settings` resolves now, one line each.

    With ``dest`` (a folder just filled), a third line says how to use it when the
    package resolves another folder first.
    """
    try:
        found = settings.data_dir(required=False)
        folder = found or "none (run 'crystal-llm data fetch' or set CRYSTAL_LLM_DATA)"
    except FileNotFoundError as err:  # $CRYSTAL_LLM_DATA names a missing folder
        found, folder = None, f"none ({_one_line(err)})"
    try:
        weights = settings.m3gnet_dir()
    except FileNotFoundError:
        weights = "none"
    lines = [f"the package uses data folder: {folder}", f"the package uses M3GNet weights: {weights}"]
    if dest is not None and (found is None or Path(found).resolve() != Path(dest).expanduser().resolve()):
        lines.append(f"to use {dest}: export CRYSTAL_LLM_DATA={dest}")
    return "\n".join(lines)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
