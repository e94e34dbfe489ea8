"""The package's shape: public entry points, ``__all__``, and the 0.1 import paths."""

import importlib
import pkgutil
import subprocess
import sys
import warnings

import pytest

import ase_crystal_llm
from ase_crystal_llm._moved import MOVED


def _modules():
    return [m.name for m in pkgutil.walk_packages(ase_crystal_llm.__path__, "ase_crystal_llm.")]


@pytest.mark.parametrize("name", _modules())
def test_every_module_declares_what_it_exports(name):
    module = importlib.import_module(name)
    assert hasattr(module, "__all__") or name.endswith(("._moved", "io", "model", "chemistry", "data",
                                                         "evaluation", "generation"))
    for export in getattr(module, "__all__", ()):
        assert hasattr(module, export), f"{name}.__all__ names {export}, which it lacks"


def test_top_level_entry_points_load_lazily():
    code = ("import sys, ase_crystal_llm as a; heavy = [m for m in ('torch', 'transformers', 'matgl') "
            "if m in sys.modules]; print(heavy); a.CrystalGenerator; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["[]", "True"]  # nothing heavy on import; torch once the generator is asked for
    for name in ase_crystal_llm.__all__:
        assert getattr(ase_crystal_llm, name) is not None


def test_old_import_paths_warn_and_resolve_to_the_new_objects():
    from ase_crystal_llm.evaluation.relaxation import relax_many
    from ase_crystal_llm.model.training import train

    with pytest.warns(DeprecationWarning, match="moved to ase_crystal_llm.model.training.train"):
        from ase_crystal_llm.training import train as old_train
    assert old_train is train
    with pytest.warns(DeprecationWarning, match="ase_crystal_llm.evaluation.relaxation.relax_many"):
        from ase_crystal_llm.calculators import relax_many as old_relax_many
    assert old_relax_many is relax_many
    with pytest.raises(ImportError):
        from ase_crystal_llm.training import no_such_name  # noqa: F401


@pytest.mark.parametrize("old", sorted(MOVED))
def test_every_old_name_still_resolves(old):
    module = importlib.import_module(f"ase_crystal_llm.{old}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for new, names in MOVED[old].items():
            target = importlib.import_module(f"ase_crystal_llm.{new}")
            for name in names:
                assert getattr(module, name) is getattr(target, name)
