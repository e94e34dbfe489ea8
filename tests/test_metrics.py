"""Sample metrics on hand-made crystals with known answers."""

import json
import math
import warnings

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk

from ase_crystal_llm.chemistry import validity
from ase_crystal_llm.evaluation import metrics
from ase_crystal_llm.model import scoring


def nacl(a=5.64):
    return bulk("NaCl", "rocksalt", a=a)


def nacl2():
    atoms = nacl()
    atoms += Atoms("Cl", positions=[[a / 4 for a in atoms.cell.lengths()]])
    return atoms


# -- validity --------------------------------------------------------------------
def test_close_atoms_are_structurally_invalid():
    atoms = Atoms("Na2", positions=[[0, 0, 0], [0.3, 0, 0]], cell=[5, 5, 5], pbc=True)
    assert not validity.structure_valid(atoms)
    atoms.positions[1] = [0.6, 0, 0]
    assert validity.structure_valid(atoms)


def test_close_periodic_images_are_invalid():
    # 0.2 A apart only across the cell boundary
    atoms = Atoms("Na2", scaled_positions=[[0.01, 0.5, 0.5], [0.97, 0.5, 0.5]], cell=[4, 4, 4], pbc=True)
    assert not validity.structure_valid(atoms)


def test_structure_validity_does_not_depend_on_the_cell_basis():
    from ase.cell import Cell

    rng = np.random.default_rng(0)
    for _ in range(40):
        try:
            cell = Cell.new(list(rng.uniform(2, 8, 3)) + list(rng.integers(40, 140, 3)))
        except AssertionError:  # impossible angles
            continue
        if cell.volume < 1:
            continue
        atoms = Atoms("NaClK", scaled_positions=rng.random((3, 3)), cell=cell, pbc=True)
        # brute force: all distances between atoms and their images in a 7x7x7 block of cells
        shifts = np.array(np.meshgrid(*[range(-3, 4)] * 3)).reshape(3, -1).T @ cell.array
        images = (atoms.positions[:, None, :] + shifts[None]).reshape(-1, 3)
        d = np.linalg.norm(atoms.positions[:, None] - images[None], axis=-1)
        d[d < 1e-9] = np.inf  # an atom itself
        assert validity.structure_valid(atoms) == (d.min() >= 0.5)
    # a nearly flat cell, as a sampler can write (lengths 9 A, angles 1 degree): a touching image
    flat = Atoms("NaCl", scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5]], cell=Cell.new([9, 9, 9, 1, 1, 1]), pbc=True)
    assert not validity.structure_valid(flat)


def test_tiny_or_open_cells_are_invalid():
    assert not validity.structure_valid(Atoms("Na", cell=[0.3, 0.3, 0.3], pbc=True))
    assert not validity.structure_valid(Atoms("Na", cell=[5, 5, 5], pbc=False))


def test_nacl_valid_nacl2_compositionally_invalid():
    assert validity.structure_valid(nacl()) and validity.composition_valid(nacl())
    assert validity.structure_valid(nacl2())
    assert not validity.composition_valid(nacl2())


@pytest.mark.parametrize("atoms", [bulk("Si"), bulk("Cu"), bulk("CuAu", "rocksalt", a=4.0)],
                         ids=["Si", "Cu", "CuAu-alloy"])
def test_elements_and_alloys_are_compositionally_valid(atoms):
    assert validity.composition_valid(atoms)


# Simple and mixed-valence oxides, halides, alloys, noble gases, elements without a Pauling
# electronegativity (Pm) or unknown to smact (Og), non-reduced formulas, and many-element
# compositions like those a weak model writes (valid and invalid).
SMACT_CASES = [
    "NaCl", "Na2Cl2", "NaCl2", "Fe2O3", "Fe4O6", "FeO2", "Fe3O4", "Mn3O4", "Co3O4", "Cr2O3", "V2O5",
    "LiFePO4", "CsPbI3", "SrTiO3", "KAlSi3O8", "Si", "O2", "He", "CuAu", "Cu3Au", "NaK", "Mg2Si",
    "HeNe", "Ne2O", "Pm2O3", "PmCl", "Og2Cl", "LiH", "LiH2", "CaF2", "CaF3", "AlN", "GaAs", "SiC",
    "SiO", "CO3", "NO3", "ClF3", "XeF2", "XeF3", "I2O5", "Ti5Cu2S10", "Pr2Fe2Se2O3", "La2Bi4O9",
    "CoPtSnTiBr3Cl8IO7Se7", "Cs8Tb8Bi11I7Co4S2", "Ru12As8O5Pm12Tl4Ac10", "Mo5Sb10Pd8Zn9Ga7Li10",
    "Cr6Se10Ta9Ge4Pd9Be7Rh8", "F2Sr2TeFe8CaI5Au4Zr5", "Cl5U9Fe3Na11La5Bi11Eu12Er5",
    "Li10Cr5H3BaLu9BrEr10Pb4", "Au6Rh9Ho12P11Pb12Zn6F2", "Pm11Fe9V3W8Pu7Ru12Np9",
]


@pytest.mark.slow
def test_composition_valid_agrees_with_smact_validity():
    from pymatgen.core import Composition
    from smact.screening import smact_validity

    def reference(formula):
        try:
            return bool(smact_validity(Composition(formula), use_pauling_test=True, include_alloys=True,
                                       oxidation_states_set=validity.OXIDATION_STATES))
        except KeyError:  # an element smact does not know
            return False

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = {f: reference(f) for f in SMACT_CASES}
    got = {f: validity.composition_valid(Atoms(f)) for f in SMACT_CASES}
    assert got == want
    many = [f for f in SMACT_CASES if len(Atoms(f).symbols.species()) >= 6]
    assert {want[f] for f in many} == {True, False}  # both answers exercised with many elements


def test_validity_flags_and_rates_count_unparsed_output():
    structures = [nacl(), nacl2(), Atoms("Na2", positions=[[0, 0, 0], [0.3, 0, 0]], cell=[5, 5, 5], pbc=True)]
    flags = validity.validity_flags(structures)
    assert flags["structure"] == [True, True, False]
    assert flags["composition"] == [True, False, True]
    assert flags["valid"] == [True, False, False]
    rates = validity.validity_rates(flags)
    assert rates["valid"] == pytest.approx(1 / 3)
    assert validity.validity_rates(flags, n_total=6)["structure"] == pytest.approx(2 / 6)


def test_emitted_validity_uses_recorded_attempts():
    a, b, c = nacl(), nacl(), nacl2()
    a.info.update(attempts=3, formula_constrained=False)
    b.info.update(attempts=1, formula_constrained=True)
    c.info.update(attempts=1, constrained=True)  # the key before 0.2 still counts
    out = metrics.emitted_validity([a, b, c])
    assert out["all"]["emitted"] == 5 and out["all"]["returned"] == 3
    assert out["all"]["valid_over_emitted"] == pytest.approx(2 / 5)
    assert out["all"]["valid_over_returned"] == pytest.approx(2 / 3)
    assert out["constrained"]["valid_over_emitted"] == pytest.approx(1 / 2)
    assert out["unconstrained"]["valid_over_emitted"] == pytest.approx(1 / 3)
    assert metrics.emitted_validity([nacl()]) is None
    # a run record also counts crystals that never parsed
    stats = {"attempts": 9, "returned": 3, "gave_up": 1, "parse_failures": {"truncated": 6}}
    out = metrics.emitted_validity([a, b, c], stats=stats)
    assert out["all"]["emitted"] == 9 and out["all"]["valid_over_emitted"] == pytest.approx(2 / 9)
    assert out["all"]["gave_up"] == 1 and out["all"]["parse_failures"] == 6
    assert out["constrained"]["emitted"] == 2


# -- uniqueness and novelty ------------------------------------------------------
def test_uniqueness_groups_matching_structures():
    shifted = nacl()
    shifted.translate([0.3, 0.1, 0.2])
    supercell = nacl().repeat((2, 1, 1))
    flags = metrics.unique_flags([nacl(), shifted, bulk("Si"), supercell, nacl(6.5), bulk("Si", "fcc", a=3.9)])
    # the scaled NaCl also matches (StructureMatcher scales volumes); fcc Si differs from diamond Si
    assert flags == [True, False, True, False, False, True]


def test_novelty_against_known_set():
    known = [nacl(), bulk("Si")]
    kcl = bulk("KCl", "rocksalt", a=6.3)
    cscl = bulk("NaCl", "cesiumchloride", a=3.4)
    flags = metrics.novelty_flags([nacl().repeat(2), kcl, cscl, bulk("Si", "fcc", a=3.9)], known)
    assert flags == [False, True, True, True]


def test_novelty_index_from_csv_parses_only_matching_formulas(tmp_path):
    import csv

    from pymatgen.io.cif import CifWriter

    path = tmp_path / "train.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["material_id", "pretty_formula", "cif"])
        writer.writeheader()
        writer.writerow({"material_id": "a", "pretty_formula": "NaCl",
                         "cif": str(CifWriter(validity.as_structure(nacl())))})
        writer.writerow({"material_id": "b", "pretty_formula": "Si", "cif": "not a cif"})
    index = metrics.NoveltyIndex.from_csv(path)
    assert len(index) == 2
    assert not index.is_novel(nacl())
    assert index.is_novel(bulk("KCl", "rocksalt", a=6.3))
    assert index.is_novel(bulk("Si"))  # the unreadable row matches nothing


# -- fingerprints, coverage, diversity -------------------------------------------
@pytest.fixture(scope="module")
def small_fps():
    structures = [nacl(), bulk("KCl", "rocksalt", a=6.3), bulk("Si"), bulk("Cu"), bulk("MgO", "rocksalt", a=4.2)]
    return metrics.Fingerprints.from_structures(structures)


def test_fingerprints_shapes(small_fps):
    assert small_fps.structure.shape == (5, 61) and small_fps.composition.shape == (5, 132)
    assert small_fps.ok.all()
    assert small_fps.n_elements.tolist() == [2, 2, 1, 1, 2]
    assert small_fps.density[2] == pytest.approx(2.33, abs=0.05)


def _take(fps, idx):
    return metrics.Fingerprints(fps.structure[idx], fps.composition[idx], fps.density[idx], fps.n_elements[idx])


def test_coverage_known_answers(small_fps):
    ref = small_fps
    same = metrics.coverage(ref, ref)
    assert same == dict.fromkeys(metrics.COVERAGE_KEYS, 1.0)
    # two of five reference crystals, plus three invalid samples without fingerprints
    # (unscaled composition features: only identical compositions are within 10)
    raw = metrics.CompositionScaler(np.zeros(132), np.ones(132))
    part = metrics.coverage(_take(ref, [0, 2]), ref, n_total=5, scaler=raw)
    assert part["recall"] == pytest.approx(2 / 5)
    assert part["precision"] == pytest.approx(2 / 5)
    # standardised over this small set, NaCl also covers rock-salt KCl
    assert metrics.coverage(_take(ref, [0]), ref)["recall"] >= 2 / 5
    # a structure fingerprint far from everything never counts
    far = _take(ref, [0])
    far.structure = far.structure + 1.0
    apart = metrics.coverage(far, ref)
    assert apart["precision"] == apart["structure_precision"] == 0.0
    assert apart["composition_precision"] == 1.0  # its composition is still NaCl's: the structure keeps it out
    # and a composition far from everything: only the structure criterion holds
    odd = _take(ref, [0])
    odd.composition = odd.composition + 1e3
    assert metrics.coverage(odd, ref, n_total=2) == {"recall": 0.0, "precision": 0.0, "structure_precision": 0.5,
                                                     "composition_precision": 0.0}


def test_wasserstein_and_diversity(small_fps):
    w = metrics.wasserstein(small_fps, small_fps)
    assert w == {"density": 0.0, "n_elements": 0.0}
    w = metrics.wasserstein(_take(small_fps, [2, 3]), small_fps)
    assert w["n_elements"] == pytest.approx(0.6)  # {1,1} vs {2,2,1,1,2}
    d = metrics.diversity(small_fps)
    assert d["structure"] > 0 and d["composition"] > 0
    assert metrics.diversity(_take(small_fps, [0, 0]))["structure"] == 0.0


def test_fingerprints_save_load(small_fps, tmp_path):
    small_fps.save(tmp_path / "fp.npz")
    back = metrics.Fingerprints.load(tmp_path / "fp.npz")
    np.testing.assert_array_equal(back.structure, small_fps.structure)
    np.testing.assert_array_equal(back.n_elements, small_fps.n_elements)


def test_fingerprints_take_concatenate_and_extra_arrays(small_fps, tmp_path):
    parts = [small_fps.take([0, 1]), small_fps.take(np.arange(5) >= 2)]
    joined = metrics.Fingerprints.concatenate(parts)
    for name in ("structure", "composition", "density", "n_elements"):
        np.testing.assert_array_equal(getattr(joined, name), getattr(small_fps, name))
    empty = metrics.Fingerprints.concatenate([])
    assert len(empty) == 0 and empty.structure.shape == (0, 61) and empty.composition.shape == (0, 132)
    with open(tmp_path / "fp.npz", "wb") as handle:  # an open file: no ".npz" appended to a temporary name
        small_fps.save(handle, rows=np.arange(5))
    with np.load(tmp_path / "fp.npz") as data:
        assert data["rows"].tolist() == [0, 1, 2, 3, 4]
    assert len(metrics.Fingerprints.load(tmp_path / "fp.npz")) == 5
    np.savez(tmp_path / "bad.npz", structure=small_fps.structure)
    with pytest.raises(ValueError, match="no array"):
        metrics.Fingerprints.load(tmp_path / "bad.npz")


# -- stability and conditions ----------------------------------------------------
def test_stability_rates_count_failures():
    e_hull = [-0.01, 0.0, 0.05, 0.2, None, float("nan")]
    unique = [True, False, True, True, True, True]
    novel = [True, True, True, True, True, True]
    out = metrics.stability_rates(e_hull, unique=unique, novel=novel)
    assert out["metastable"] == pytest.approx(3 / 6)
    assert out["stable"] == pytest.approx(2 / 6)
    assert out["sun"] == pytest.approx(1 / 6)


def test_sun_at_both_thresholds_on_hand_made_samples():
    """Uniqueness and novelty by StructureMatcher, then S.U.N. at E_hull <= 0 and < 0.1 eV/atom."""
    training = [bulk("NaCl", "rocksalt", a=5.64)]
    samples = [
        bulk("KCl", "rocksalt", a=6.29),  # new and on the hull: S.U.N. at both thresholds
        bulk("KCl", "rocksalt", a=6.35),  # the same structure again (StructureMatcher scales volume)
        bulk("NaCl", "rocksalt", a=5.70),  # a training crystal
        bulk("LiF", "rocksalt", a=4.03),  # new, 0.05 above the hull: metastable S.U.N. only
        bulk("CsCl", "cesiumchloride", a=4.12),  # new but far off the hull
        bulk("KBr", "rocksalt", a=6.60),  # its relaxation failed: no E_hull
    ]
    e_hull = [-0.02, -0.02, -0.05, 0.05, 0.5, None]
    unique = metrics.unique_flags(samples)
    index = metrics.NoveltyIndex(training)
    novel = [index.is_novel(s) for s in samples]
    assert unique == [True, False, True, True, True, True]
    assert novel == [True, True, False, True, True, True]
    out = metrics.stability_rates(e_hull, unique=unique, novel=novel)
    assert out["stable"] == pytest.approx(3 / 6) and out["metastable"] == pytest.approx(4 / 6)
    assert out["sun"] == pytest.approx(1 / 6)  # KCl only
    assert out["msun"] == pytest.approx(2 / 6)  # KCl and LiF


def test_conditional_accuracy():
    a = nacl()
    a.info["condition_formula"] = "Na2Cl2"
    a.info["condition_spacegroup"] = 225
    b = bulk("Si")
    b.info["conditions"] = json.dumps({"formula": "SiO2", "spacegroup": 227})
    c = bulk("Cu")  # unconditioned: not counted
    out = metrics.conditional_accuracy([a, b, c])
    assert out["formula"] == {"n": 2, "match": 0.5}
    assert out["spacegroup"]["n"] == 2
    assert out["spacegroup"]["match_symprec_0.1"] == 1.0
    assert out["spacegroup"]["match_symprec_0.2"] == 1.0
    assert out["spacegroup"]["crystal_system_match_symprec_0.1"] == 1.0
    # Fm-3m asked, Pm-3m written (CsCl-like): another group of the same (cubic) system
    cscl = bulk("CsCl", "cesiumchloride", a=4.1)
    cscl.info["condition_spacegroup"] = 225
    hexagonal = bulk("Mg")  # P6_3/mmc
    hexagonal.info["condition_spacegroup"] = 225
    out = metrics.conditional_accuracy([cscl, hexagonal])
    assert out["spacegroup"]["match_symprec_0.1"] == 0.0
    assert out["spacegroup"]["crystal_system_match_symprec_0.1"] == 0.5
    assert metrics.crystal_system(194) == "hexagonal" and metrics.crystal_system(166) == "trigonal"
    rattled = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    rattled.positions[0, 0] += 0.08  # within 0.2 A of Fm-3m, not within 0.1 A
    rattled.info["condition_spacegroup"] = 225
    out = metrics.conditional_accuracy([rattled])
    assert out["spacegroup"]["match_symprec_0.2"] == 1.0
    assert out["spacegroup"]["match_symprec_0.1"] == 0.0
    assert "formula" not in out
    assert math.isfinite(out["spacegroup"]["n"])


# -- IPT -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def random_lm():
    """A randomly initialised two-layer LLaMA with the from-scratch tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ase_crystal_llm.text.prompts import PromptTemplate
    from ase_crystal_llm.text.tokenizer import tokenizer_for_template

    template = PromptTemplate()
    tokenizer = tokenizer_for_template(template)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval(), tokenizer, template


def test_batched_perplexity_matches_single_forward(random_lm):
    import torch

    from ase_crystal_llm.model.encoding import encode_example
    from ase_crystal_llm.text.format import atoms_to_text

    model, tokenizer, template = random_lm
    prompt = template.generation_prompt()
    texts = [atoms_to_text(bulk("Si")), atoms_to_text(nacl().repeat((2, 1, 1)))]  # different lengths
    batch = scoring.answer_perplexities(model, tokenizer, prompt, texts)
    for text, value in zip(texts, batch):
        ids, n_prompt = encode_example(tokenizer, prompt, text)
        ids = torch.as_tensor(ids)[None]
        labels = ids.clone()
        labels[0, :n_prompt] = -100
        with torch.no_grad():
            expected = float(torch.exp(model(input_ids=ids, labels=labels).loss))
        assert value == pytest.approx(expected, rel=1e-4)


def test_ipt_random_model(random_lm):
    model, tokenizer, template = random_lm
    out = scoring.ipt(model, tokenizer, template, [nacl(), bulk("Si")], n_translations=5, seed=1)
    assert out["n_structures"] == 2 and out["n_translations"] == 5
    assert math.isfinite(out["ipt"]) and out["ipt"] >= 0
    assert 0 <= out["ipt_normalized"] < 1 and len(out["values"]) == 2
    assert out == scoring.ipt(model, tokenizer, template, [nacl(), bulk("Si")], n_translations=5, seed=1)


def test_novelty_index_over_several_splits(tmp_path):
    """A structure known from either file is not novel (evaluate indexes MP-20 train + val)."""
    import csv

    from ase.build import bulk
    from pymatgen.io.ase import AseAtomsAdaptor
    from pymatgen.io.cif import CifWriter

    from ase_crystal_llm.evaluation.metrics import NoveltyIndex

    def write(path, crystals):
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["material_id", "pretty_formula", "cif"])
            for i, atoms in enumerate(crystals):
                structure = AseAtomsAdaptor.get_structure(atoms)
                writer.writerow([f"x-{i}", structure.composition.reduced_formula, str(CifWriter(structure))])

    nacl, si, cu = bulk("NaCl", "rocksalt", a=5.64), bulk("Si", "diamond", a=5.43), bulk("Cu", "fcc", a=3.6)
    write(tmp_path / "train.csv", [nacl])
    write(tmp_path / "val.csv", [si])
    both = NoveltyIndex.from_csv([tmp_path / "train.csv", tmp_path / "val.csv"])
    assert [both.is_novel(a) for a in (nacl, si, cu)] == [False, False, True]
    assert NoveltyIndex.from_csv(tmp_path / "train.csv").is_novel(si)  # one file: the old behaviour
