"""What every benchmark records about the machine it ran on."""

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("ase-crystal-llm", "torch", "transformers", "peft", "ase", "pymatgen", "matgl")


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
