"""``crystal-llm data``: fetch, check and link the data folder, never over the internet.

Small fake files stand in for the data: a mirror laid out like the data folder (served
as ``file://`` and by a loopback ``http.server``) and fake "upstream" sources (CDVAE-style
CSVs with an index column).  The manifest's URLs and hashes are patched to point at them.
"""

import contextlib
import csv
import dataclasses
import functools
import gzip
import hashlib
import http.server
import io
import json
import re
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from ase_crystal_llm import cli, settings
from ase_crystal_llm.data import download
from ase_crystal_llm.data.datasets import read_structures

COLUMNS = ["material_id", "formation_energy_per_atom", "band_gap", "pretty_formula", "e_above_hull",
           "elements", "cif", "spacegroup.number"]


def _sha(content):
    return hashlib.sha256(content).hexdigest()


@pytest.fixture(scope="module")
def nacl_cif():
    from pymatgen.core import Lattice, Structure
    from pymatgen.io.cif import CifWriter

    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    return str(CifWriter(nacl))


def _csv_text(rows, index):
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(([""] if index else []) + COLUMNS)
    for number, row in enumerate(rows):
        writer.writerow(([number] if index else []) + row)
    return out.getvalue()


@pytest.fixture
def fake(tmp_path, monkeypatch, nacl_cif):
    """Fake data: ``mirror`` (the data folder's layout), ``upstream`` (CDVAE CSVs and the other files).

    ``placed`` maps each manifest path to the bytes a mirror fetch must put in place.
    """
    mirror, upstream = tmp_path / "mirror", tmp_path / "upstream"
    placed, entries = {}, []
    for entry in download.MANIFEST:
        if entry.cdvae_csv:
            split = Path(entry.path).name.split(".")[0]
            rows = [[f"mp-{split}-{i}", -1.5 - i, 4.0, "NaCl", "", "['Cl', 'Na']", nacl_cif, 225] for i in range(2)]
            content = gzip.compress(_csv_text(rows, index=False).encode(), mtime=0)
            source = upstream / f"{split}.csv"
            source.parent.mkdir(parents=True, exist_ok=True)
            source.write_text(_csv_text(rows, index=True), encoding="utf-8")
            entries.append(dataclasses.replace(entry, urls=(source.as_uri(),), known_sha256=()))
        else:
            content = f"fake {entry.path}\n".encode()
            source = upstream / entry.path
            source.parent.mkdir(parents=True, exist_ok=True)
            source.write_bytes(content)
            entries.append(dataclasses.replace(entry, urls=(source.as_uri(),), sha256=_sha(content)))
        placed[entry.path] = content
        (mirror / entry.path).parent.mkdir(parents=True, exist_ok=True)
        (mirror / entry.path).write_bytes(content)
    monkeypatch.setattr(download, "MANIFEST", tuple(entries))
    monkeypatch.setattr(download, "TIMEOUT", 10)  # a stuck loopback server fails the test quickly

    def no_matgl(name):
        raise RuntimeError("the matgl by-name download is not reachable in tests")

    monkeypatch.setattr(download, "_matgl_model_files", no_matgl)
    return SimpleNamespace(mirror=mirror, upstream=upstream, placed=placed)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _serve(folder):
    """Serve ``folder`` over HTTP on 127.0.0.1 in a thread; shut down on exit."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(params=["file", "http"])
def mirror_url(request, fake, monkeypatch):
    """The fake mirror as a file:// URL, then through a loopback HTTP server."""
    if request.param == "file":
        yield fake.mirror.as_uri()
        return
    for name in ("no_proxy", "NO_PROXY"):  # never send loopback requests to a configured proxy
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    with _serve(fake.mirror) as url:
        yield url


def _leftovers(folder):
    return [p for p in Path(folder).rglob("*") if p.name.endswith(".part")]


def _states(folder):
    return {s.path: s.state for s in download.check(folder)}


def _isolate_settings(tmp_path, monkeypatch):
    """No $CRYSTAL_LLM_DATA and no shared/ folder anywhere settings would look."""
    for name in ("CRYSTAL_LLM_DATA", "CRYSTAL_LLM_M3GNET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CRYSTAL_LLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(settings, "PACKAGE_DIR", tmp_path / "site" / "packages" / "ase_crystal_llm")
    work = tmp_path / "home" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)


def test_fetch_from_mirror(fake, mirror_url, tmp_path):
    dest = tmp_path / "data"
    assert download.fetch(dest, mirror=mirror_url, progress=False) == dest
    for path, content in fake.placed.items():
        assert (dest / path).read_bytes() == content, path
    assert not _leftovers(dest)
    assert set(_states(dest).values()) == {download.OK}
    record = download.read_record(dest)
    assert set(record) == set(fake.placed)
    assert record["mp_20/train.csv.gz"]["checked"].startswith("no published sha256")
    assert record["hull/2023-02-07-mp-elemental-reference-entries.json.gz"]["checked"] == "published sha256"


def test_mirror_may_be_a_plain_folder(fake, tmp_path):
    dest = download.fetch(tmp_path / "data", mirror=str(fake.mirror), progress=False)
    assert not download.missing(dest)


def test_fetch_converts_cdvae_csv(fake, tmp_path):
    dest = download.fetch(tmp_path / "data", progress=False)  # from the (fake) public sources
    path = settings.mp20_path("train", dest)
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        assert handle.readline().rstrip("\n").split(",") == COLUMNS  # the index column is gone
    crystals = read_structures(path, canonical=False)
    assert [a.info["material_id"] for a in crystals] == ["mp-train-0", "mp-train-1"]
    assert crystals[0].info["spacegroup_number"] == 225 and "e_above_hull" not in crystals[0].info
    record = download.read_record(dest)["mp_20/train.csv.gz"]
    # No checksum is published for CDVAE's CSVs: the downloaded bytes' hash is recorded.
    assert record["source_sha256"] == _sha((fake.upstream / "train.csv").read_bytes())
    assert record["sha256"] == download.sha256_of(path)
    assert _states(dest)["mp_20/train.csv.gz"] == download.OK


def test_wrong_hash_leaves_no_file(fake, mirror_url, tmp_path, monkeypatch):
    hull = "hull/2023-02-07-mp-elemental-reference-entries.json.gz"
    wrong = "0" * 64
    monkeypatch.setattr(download, "MANIFEST", tuple(dataclasses.replace(e, sha256=wrong) if e.path == hull else e
                                                for e in download.MANIFEST))
    dest = tmp_path / "data"
    with pytest.raises(download.ChecksumError) as caught:
        download.fetch(dest, mirror=mirror_url, progress=False)
    message = str(caught.value)
    assert "\n" not in message
    assert hull in message and wrong in message and _sha(fake.placed[hull]) in message
    assert not (dest / hull).exists() and not _leftovers(dest)
    assert download.missing(dest) == [hull]  # the other files are fetched


def test_interrupted_fetch_resumes(fake, mirror_url, tmp_path, monkeypatch):
    val = fake.mirror / "mp_20" / "val.csv.gz"
    kept = val.read_bytes()
    val.unlink()
    dest = tmp_path / "data"
    with pytest.raises(OSError, match="mp_20/val.csv.gz") as caught:
        download.fetch(dest, mirror=mirror_url, progress=False)
    assert "\n" not in str(caught.value)
    assert download.missing(dest) == ["mp_20/val.csv.gz"] and not _leftovers(dest)

    val.write_bytes(kept)
    opened = []
    real_open = download._open_url
    monkeypatch.setattr(download, "_open_url", lambda url: opened.append(url) or real_open(url))
    download.fetch(dest, mirror=mirror_url, progress=False)
    assert [url.rsplit("/", 2)[-2:] for url in opened] == [["mp_20", "val.csv.gz"]]  # only what was missing
    assert not download.missing(dest) and set(_states(dest).values()) == {download.OK}


def test_matgl_by_name_fallback(fake, tmp_path, monkeypatch):
    # The real by-name download (matgl.load_model's Hugging Face hub) cannot run offline: a fake
    # loader stands in for it, returning files from a fake matgl cache.
    cache = tmp_path / "matgl-cache"
    cache.mkdir()
    files = {}
    for path, content in fake.placed.items():
        if path.startswith(download.M3GNET_DIR):
            files[Path(path).name] = cache / Path(path).name
            files[Path(path).name].write_bytes(content)
    broken = (tmp_path / "nowhere").as_uri()
    monkeypatch.setattr(download, "MANIFEST", tuple(dataclasses.replace(e, urls=(broken,)) if e.matgl_model else e
                                                for e in download.MANIFEST))
    asked = []
    monkeypatch.setattr(download, "_matgl_model_files", lambda name: asked.append(name) or files)
    dest = download.fetch(tmp_path / "data", progress=False)
    assert set(asked) == {settings.M3GNET_NAME}
    assert not download.missing(dest) and set(_states(dest).values()) == {download.OK}
    assert "matgl.load_model" in download.read_record(dest)[f"{download.M3GNET_DIR}/model.pt"]["source"]

    # matgl's copy is checked like any other download
    files["state.pt"].write_bytes(b"other weights")
    (dest / download.M3GNET_DIR / "state.pt").unlink()
    with pytest.raises(download.ChecksumError, match="state.pt: sha256 mismatch"):
        download.fetch(dest, progress=False)
    assert not (dest / download.M3GNET_DIR / "state.pt").exists() and not _leftovers(dest)


def test_cli_check(fake, tmp_path, capsys):
    dest = download.fetch(tmp_path / "data", progress=False)
    hull = "hull/2023-02-07-mp-elemental-reference-entries.json.gz"
    fetched = (dest / "mp_20" / "test.csv.gz").read_bytes()
    (dest / hull).write_bytes(b"changed")
    (dest / "mp_20" / "test.csv.gz").write_bytes(b"changed after the fetch")
    (dest / download.M3GNET_DIR / "model.pt").unlink()
    assert cli.main(["data", "check", str(dest)]) == 1
    rows = [re.match(r"  (OK|missing|wrong sha256|unverified) +(\S+)", line)
            for line in capsys.readouterr().out.splitlines()]
    states = {row[2]: row[1] for row in rows if row}
    assert states == {**{path: "OK" for path in fake.placed}, hull: "wrong sha256",
                      "mp_20/test.csv.gz": "wrong sha256",  # against the hash recorded at the fetch
                      f"{download.M3GNET_DIR}/model.pt": "missing"}

    (dest / hull).write_bytes(fake.placed[hull])
    (dest / "mp_20" / "test.csv.gz").write_bytes(fetched)
    download.fetch(dest, progress=False)
    assert cli.main(["data", "check", str(dest)]) == 0
    assert "the package uses data folder:" in capsys.readouterr().out


def test_cli_fetch_and_errors(fake, tmp_path, capsys, monkeypatch):
    _isolate_settings(tmp_path, monkeypatch)
    dest = tmp_path / "data"
    assert cli.main(["data", "fetch", "--dest", str(dest), "--mirror", fake.mirror.as_uri(), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert f"{len(fake.placed)} files fetched into {dest}" in captured.err
    # not the default folder: the package does not find it by itself, and says how to use it
    assert f"export CRYSTAL_LLM_DATA={dest}" in captured.out

    assert cli.main(["data", "fetch", "--dest", str(tmp_path / "x"), "--mirror", "ftp://host/data"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("crystal-llm data: error:") and "\n" not in err and "ftp" in err

    monkeypatch.setattr(download, "MANIFEST", tuple(dataclasses.replace(e, sha256="f" * 64) if e.sha256 else e
                                                for e in download.MANIFEST))
    assert cli.main(["data", "fetch", "--dest", str(tmp_path / "y"), "--mirror", str(fake.mirror),
                     "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "sha256 mismatch" in err
    assert cli.main(["data", "check", str(tmp_path / "absent")]) == 2


def test_data_dir_finds_fetched_folder(fake, tmp_path, monkeypatch):
    _isolate_settings(tmp_path, monkeypatch)
    assert settings.data_dir(required=False) is None
    with pytest.raises(FileNotFoundError, match="crystal-llm data fetch"):
        settings.data_dir()

    dest = download.fetch(mirror=fake.mirror.as_uri(), progress=False)  # the default folder
    assert dest == tmp_path / "cache" / "data"
    assert settings.data_dir() == dest
    assert settings.mp20_path("test") == dest / "mp_20" / "test.csv.gz"
    assert settings.m3gnet_dir() == dest / download.M3GNET_DIR
    assert "export CRYSTAL_LLM_DATA" not in download.describe_in_use(dest)


def test_link(fake, tmp_path, monkeypatch, capsys):
    _isolate_settings(tmp_path, monkeypatch)
    source = download.fetch(tmp_path / "site-data", mirror=fake.mirror.as_uri(), progress=False)
    assert cli.main(["data", "link", str(source)]) == 0
    default = tmp_path / "cache" / "data"
    assert default.is_symlink() and default.resolve() == source.resolve()
    assert settings.data_dir() == default
    assert f"data folder: {default}" in capsys.readouterr().out
    assert download.link(source) == default  # linking again replaces the link

    (source / "mp_20" / "val.csv.gz").unlink()
    (source / "hull" / "2023-02-07-mp-elemental-reference-entries.json.gz").unlink()
    with pytest.raises(FileNotFoundError) as caught:
        download.link(source, tmp_path / "other")
    message = str(caught.value)
    assert "\n" not in message and "mp_20/val.csv.gz" in message and "hull/" in message
    assert not (tmp_path / "other").exists()

    real = tmp_path / "real"
    real.mkdir()
    download.fetch(source, mirror=fake.mirror.as_uri(), progress=False)
    with pytest.raises(FileExistsError, match="not a link"):
        download.link(source, real)


def test_manifest_is_complete():
    """Every file settings reads has an entry, a source and, except MP-20, a published hash."""
    paths = {entry.path for entry in download.MANIFEST}
    assert {f"mp_20/{s}.csv.gz" for s in ("train", "val", "test")} <= paths
    assert "hull/2023-02-07-mp-elemental-reference-entries.json.gz" in paths
    assert {f"{download.M3GNET_DIR}/{n}" for n in ("model.json", "model.pt", "state.pt")} <= paths
    for entry in download.MANIFEST:
        assert entry.urls and all(url.startswith("https://") for url in entry.urls)
        assert entry.cdvae_csv or len(entry.sha256) == 64
    assert json.loads(json.dumps([dataclasses.asdict(e) for e in download.MANIFEST]))
