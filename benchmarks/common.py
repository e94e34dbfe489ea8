"""Shared by the benchmarks: what they record about the machine, and crystals drawn from CSV files."""

import datetime
import os
import platform
import shlex
import subprocess
import sys
import warnings
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("ase-crystal-llm", "torch", "transformers", "peft", "ase", "pymatgen", "matgl", "chgnet", "sevenn", "gguf")


def cpu_name():
    """The CPU model from lscpu (platform's guess where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or platform.machine()


def _versions():
    found = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def hardware():
    """CPU, cores, GPU (when torch sees one), torch threads, load average and package versions."""
    import torch

    info = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        # Shared machines: a load above the core count means the numbers are pessimistic.
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": _versions(),
    }
    return info


def report_header(name, argv=None):
    """What every results file starts with: the benchmark, the UTC date, the hardware and the command line."""
    args = sys.argv[1:] if argv is None else list(argv)
    return {
        "benchmark": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware(),
        "command": shlex.join(["python", f"benchmarks/{name}.py", *args]),  # quoted: it can be pasted back
    }


def sample_csv(path, n, seed=0):
    """``n`` random rows (pandas ``sample``, ``random_state=seed``) of a CSV with a ``cif`` column as ``ase.Atoms``.

    Cells are kept as written (not canonicalized).  ``info`` gets ``material_id``
    and ``formation_energy_per_atom`` where the file has them, else ``row`` (the
    row's position in the file, from 0).
    """
    import pandas as pd
    from pymatgen.core import Structure
    from pymatgen.io.ase import AseAtomsAdaptor

    from ase_crystal_llm.data.datasets import csv_reader

    with csv_reader(path) as rows:
        frame = pd.DataFrame(list(rows))  # text as written; pandas only draws the sample
    frame = frame.sample(n=n, random_state=seed) if n < len(frame) else frame
    out = []
    for position, row in zip(frame.index, frame.to_dict("records")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pymatgen: "fractional coordinates rounded to ideal values"
            atoms = AseAtomsAdaptor.get_atoms(Structure.from_str(row["cif"], fmt="cif"))
        if "material_id" in row:
            atoms.info = {"material_id": row["material_id"],
                          "formation_energy_per_atom": float(row["formation_energy_per_atom"])}
        else:
            atoms.info = {"row": int(position)}
        out.append(atoms)
    return out


def mp20_sample(n, seed=0, split="test", data=None):
    """``n`` random MP-20 crystals (DFT cells) with material_id and formation energy in info."""
    from ase_crystal_llm import settings


    return sample_csv(settings.mp20_path(split, data), n, seed)
