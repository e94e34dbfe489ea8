"""``crystal-llm search`` / :func:`run_search`: a real ase_ga database, resume, kill -9, bad input.

Searches here relax with EMT on fcc alloys, against a hull of EMT's own
elemental energies, so that they take seconds and need no shared data.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from ase_crystal_llm.cli import main

# The set-up every search here uses; also run as the head of the subprocess scripts.
SETUP = textwrap.dedent("""
    import time
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase_crystal_llm.evaluation.hull import ReferenceHull

    METALS = ["Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Al"]

    class MPScaleEMT(EMT):
        energy_scale = "mp2020"  # no MP2020 corrections for metals: EMT's numbers go straight to the hull
        delay = 0.0

        def calculate(self, *args, **kwargs):
            time.sleep(self.delay)
            super().calculate(*args, **kwargs)

    def emt_hull():
        mu = {}
        for element in METALS:
            atoms = bulk(element, "fcc", a=4.0)
            atoms.calc = EMT()
            mu[element] = atoms.get_potential_energy()
        hull = ReferenceHull([], mu)
        hull.name = "EMT fcc elements"
        return hull

    def alloys():
        out = []
        for host, guest in [("Cu", "Au"), ("Ni", "Pt"), ("Ag", "Pd")]:
            atoms = bulk(host, "fcc", a=3.9, cubic=True)
            atoms[0].symbol = guest
            out.append(atoms)
        return out
""")
_namespace = {}
exec(SETUP, _namespace)
MPScaleEMT, emt_hull, alloys, METALS = (_namespace[k] for k in ("MPScaleEMT", "emt_hull", "alloys", "METALS"))

NO_MODEL = "template,strain,permutation,random"


@pytest.fixture(scope="module")
def hull():
    return emt_hull()


def _search(db, budget, hull, **options):
    from ase_crystal_llm.ga.search import run_search

    options = {"operators": NO_MODEL, "population": 4, "batch_size": 3, "progress": False, **options}
    return run_search(options.pop("start", alloys()), db, budget, hull=hull, calculator=MPScaleEMT(), **options)


def _relaxed_ids(db):
    import ase.db

    return [row.gaid for row in ase.db.connect(str(db)).select(relaxed=1)]


def test_short_search_writes_an_ase_ga_database(tmp_path, hull):
    from ase_ga.data import DataConnection
    from ase_ga.population import Population

    db = tmp_path / "search.db"
    summary = _search(db, 12, hull, elements=",".join(METALS))
    ids = _relaxed_ids(db)
    assert len(ids) == 12 and len(set(ids)) == 12  # the budget, none relaxed twice
    assert summary["relaxations"] == 12 and summary["children"] == 9 and summary["stopped"] is None
    connection = DataConnection(str(db))  # ase_ga's own reader
    assert connection.get_number_of_unrelaxed_candidates() == 0
    assert not connection.get_all_candidates_in_queue()
    population = Population(connection, 4)
    assert len(population.pop) == 4
    for atoms in connection.get_all_relaxed_candidates():
        kvp = atoms.info["key_value_pairs"]
        assert kvp["raw_score"] == pytest.approx(-kvp["e_above_hull"])
        assert kvp["potential"] == "mpscaleemt" and kvp["hull"] == "EMT fcc elements"
        assert set(atoms.get_chemical_symbols()) <= set(METALS)
        if kvp["operator"] == "start":
            continue
        assert kvp["operator"] in NO_MODEL.split(",") and kvp["model"] == "none"
        assert kvp["parent_id"] in ids and atoms.info["data"]["parents"] == [kvp["parent_id"]]
    best = summary["best"][0]["e_above_hull"]
    assert best == min(a.info["key_value_pairs"]["e_above_hull"] for a in connection.get_all_relaxed_candidates())


def test_llm_operator_records_its_model(tmp_path, hull):
    from types import SimpleNamespace

    from test_infill import _tiny_generator

    generator = _tiny_generator()
    db = tmp_path / "llm.db"
    summary = _search(db, 7, hull, operators="llm", generator=generator, elements=",".join(METALS))
    assert summary["by_operator"]["llm"] == 4
    import ase.db

    rows = list(ase.db.connect(str(db)).select(relaxed=1, operator="llm"))
    assert rows and all(r.model == SimpleNamespace.__name__ and "LLMElementMutation" in r.description for r in rows)
    assert all(0 < r.data["swap_probability"] <= 1 for r in rows)


def test_duplicates_never_cost_a_relaxation(tmp_path, hull):
    from ase_crystal_llm.evaluation.metrics import unique_flags

    db = tmp_path / "dup.db"
    # One parent, two elements, a tight pool: the template swap soon runs out of new children.
    start = [alloys()[0]]
    summary = _search(db, 30, hull, operators="template", elements="Cu,Au,Ag", start=start)
    import ase.db

    unrelaxed = [row.toatoms() for row in ase.db.connect(str(db)).select(relaxed=0)]
    assert all(unique_flags(unrelaxed))  # no two candidates alike before relaxation
    assert summary["relaxations"] < 30 and "nothing new" in summary["stopped"]


def test_resume_to_a_larger_budget_keeps_the_settings(tmp_path, hull):
    from ase_crystal_llm.ga.search import run_search

    db = tmp_path / "grow.db"
    _search(db, 5, hull, seed=3)
    summary = run_search(None, db, 9, resume=True, hull=hull, calculator=MPScaleEMT(), progress=False)
    ids = _relaxed_ids(db)
    assert summary["relaxations"] == 9 and len(set(ids)) == 9
    with pytest.raises(ValueError, match="other settings.*operators"):
        run_search(None, db, 12, resume=True, operators="template", hull=hull, calculator=MPScaleEMT())
    with pytest.raises(FileExistsError):
        _search(db, 12, hull)  # not resume: refused, nothing touched
    assert len(_relaxed_ids(db)) == 9


KILLED_WORKER = SETUP + textwrap.dedent("""
    import sys
    from ase_crystal_llm.ga.search import run_search
    calc = MPScaleEMT()
    calc.delay = 0.02
    run_search(alloys(), sys.argv[1], 40, resume=True, hull=emt_hull(), calculator=calc,
               operators="template,strain,permutation", population=4, batch_size=2, progress=False)
""")


@pytest.mark.subprocess
def test_kill_9_then_resume_loses_and_repeats_nothing(tmp_path, hull):
    from ase_crystal_llm.ga.search import run_search

    db = tmp_path / "killed.db"
    script = tmp_path / "worker.py"
    script.write_text(KILLED_WORKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(script), str(db)], env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if db.exists() and len(_relaxed_ids(db)) >= 6:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _relaxed_ids(db)
    assert 6 <= len(before) < 40
    summary = run_search(None, db, 40, resume=True, hull=hull, calculator=MPScaleEMT(), progress=False)
    after = _relaxed_ids(db)
    assert len(after) == 40 and len(set(after)) == 40 and summary["relaxations"] == 40
    assert set(before) <= set(after)
    from ase_ga.data import DataConnection

    assert not DataConnection(str(db)).get_all_candidates_in_queue()  # the dead claims were taken over



def test_a_killed_worker_not_yet_reaped_holds_no_claim():
    """A SIGKILLed worker stays a zombie until its parent waits for it: its claims are free all the same."""
    from ase_crystal_llm.ga.database import _alive

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert _alive(proc.pid)
    proc.send_signal(signal.SIGKILL)
    deadline = time.time() + 10
    while _alive(proc.pid) and time.time() < deadline:  # killed, not waited for
        time.sleep(0.05)
    assert not _alive(proc.pid)
    proc.wait()
    assert not _alive(proc.pid) and _alive(os.getpid())

@pytest.mark.parametrize("argv, message", [
    (["missing.cif", "-o", "{tmp}/s.db", "--budget", "5"], "neither a file"),
    (["{tmp}/start.extxyz", "-o", "{tmp}/s.db", "--budget", "0"], "positive integer"),
    (["{tmp}/start.extxyz", "-o", "{tmp}/s.db", "--budget", "5", "--operators", "llm,crossover"], "unknown operator"),
    (["{tmp}/start.extxyz", "-o", "{tmp}/s.db", "--budget", "5", "--elements", "Cu,Ag"], "outside the search's"),
    (["{tmp}/start.extxyz", "-o", "{tmp}/s.xyz", "--budget", "5"], ".db file or a postgresql"),
    (["-o", "{tmp}/s.db", "--budget", "5"], "no starting structures"),
    (["{tmp}/empty.extxyz", "-o", "{tmp}/s.db", "--budget", "5"], "Empty file"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    from ase.io import write

    write(tmp_path / "start.extxyz", alloys()[0])
    (tmp_path / "empty.extxyz").write_text("")
    code = main(["search", *[a.format(tmp=tmp_path) for a in argv]])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s.db").exists()


def test_cli_refuses_an_existing_search(tmp_path, capsys, hull):
    db = tmp_path / "s.db"
    _search(db, 3, hull)
    from ase.io import write

    write(tmp_path / "start.extxyz", alloys()[0])
    code = main(["search", str(tmp_path / "start.extxyz"), "-o", str(db), "--budget", "5"])
    assert code == 2 and "--resume" in capsys.readouterr().err
    assert len(_relaxed_ids(db)) == 3


def test_operator_weights_parse():
    from argparse import ArgumentTypeError

    from ase_crystal_llm.ga.options import operator_weights

    assert operator_weights("llm:3, strain") == {"llm": 3.0, "strain": 1.0}
    for bad in ("", "llm:-1", "llm:x", "llm,llm", "llm:inf"):
        with pytest.raises(ArgumentTypeError):
            operator_weights(bad)


@pytest.mark.potential
def test_cli_search_with_m3gnet_on_mp20(tmp_path, capsys, m3gnet_dir, tiny_model_dir, monkeypatch):
    """The command as documented: MP-20 starting crystals, the llm and template operators, M3GNet, resume."""
    monkeypatch.setenv("CRYSTAL_LLM_M3GNET", str(m3gnet_dir))
    db = tmp_path / "sto.db"
    argv = ["search", "SrTiO3", "-o", str(db), "--budget", "5", "--operators", "llm,template", "--model",
            str(tiny_model_dir), "--population", "3", "--batch-size", "2", "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "5 relaxations" in out and "below 0.1 eV/atom" in out
    assert main(["search", "-o", str(db), "--budget", "7", "--resume", "--no-progress", "--threads", "1"]) == 0
    assert "7 relaxations" in capsys.readouterr().out
    import ase.db

    rows = list(ase.db.connect(str(db)).select(relaxed=1))
    assert len(rows) == 7 and all(r.potential for r in rows) and all("MP-20" in r.hull for r in rows)
    assert np.isfinite([r.raw_score for r in rows]).all()


@pytest.mark.potential
def test_search_with_sevennet(tmp_path, data_dir):
    """``potential="sevennet"`` reaches the search: every row names it, on the MP-20 hull."""
    import importlib.util

    if importlib.util.find_spec("sevenn") is None:
        pytest.skip("the sevennet extra is not installed: pip install 'ase-crystal-llm[sevennet]'")
    import ase.db

    from ase_crystal_llm.ga.search import run_search

    db = tmp_path / "sevennet.db"
    summary = run_search("SrTiO3", db, 4, operators="template", potential="sevennet", population=2,
                         batch_size=2, data_dir=str(data_dir), progress=False, threads=1)
    assert summary["relaxations"] == 4
    rows = list(ase.db.connect(str(db)).select(relaxed=1))
    assert {r.potential for r in rows} == {"sevennet-0-11jul2024"} and all("MP-20" in r.hull for r in rows)


def test_search_with_only_failed_relaxations_says_why(tmp_path, hull):
    """A potential that fails every start leaves no parent: the search stops and says so."""
    from ase.calculators.calculator import CalculatorError

    class Broken(MPScaleEMT):
        def calculate(self, *args, **kwargs):
            raise CalculatorError("no energy for you")

    from ase_crystal_llm.ga.search import run_search

    summary = run_search(alloys(), tmp_path / "broken.db", 10, hull=hull, calculator=Broken(), operators="template",
                         progress=False)
    assert summary["relaxations"] == 3 and summary["failed"] == 3
    assert "no relaxed candidate can be a parent" in summary["stopped"]
