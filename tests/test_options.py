"""Options declared once: dataclass fields -> argparse options and docstrings (ase_crystal_llm.options)."""

import argparse
import inspect
from dataclasses import dataclass, field, fields

import pytest

from ase_crystal_llm.options import add_dataclass_arguments, document_options, options_from_args, positive_int


@dataclass
class Toy:
    path: str = field(metadata={"help": "where"})
    steps: int | None = field(default=None, metadata={"help": "how many", "type": positive_int, "group": "length"})
    epochs: float | None = field(default=None, metadata={"help": "passes", "type": float, "group": "length"})
    rank: int = field(default=8, metadata={"help": "rank (default %(default)s)", "type": int})
    cache: bool = field(default=True, metadata={"help": "cache results", "flag": "--no-cache",
                                                "cli_help": "do not cache (see --rank)"})
    hidden: float = field(default=1.0, metadata={"help": "not on the command line", "cli": False})


def parse(argv, **kwargs):
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Toy, **kwargs)
    return options_from_args(parser.parse_args(argv), Toy), parser


def test_fields_become_options():
    values, parser = parse(["--path", "p", "--steps", "3", "--no-cache"])
    assert values == {"path": "p", "steps": 3, "epochs": None, "rank": 8, "cache": False}
    assert "rank (default 8)" in parser.format_help() and "--hidden" not in parser.format_help()
    with pytest.raises(SystemExit):
        parse(["--path", "p", "--steps", "1", "--epochs", "1"])  # one group
    with pytest.raises(SystemExit):
        parse(["--steps", "1"])  # a field without a default is required
    with pytest.raises(SystemExit):
        parse(["--path", "p", "--steps", "0"])


def test_use_defaults_false_leaves_options_unset():
    values, _ = parse(["--path", "p"], use_defaults=False)
    assert values["rank"] is None and values["cache"] is True


def test_docstring_is_built_and_defaults_checked():
    @document_options(Toy)
    def run(path, *, rank=8, cache=True, hidden=1.0):
        """Run.

        Parameters
        ----------
        {options}
        """

    doc = inspect.cleandoc(run.__doc__)
    assert "rank : int\n    Rank (default 8)." in doc
    assert "cache : bool\n    Cache results." in doc and "hidden : float" in doc and "steps" not in doc
    with pytest.raises(TypeError, match="rank=4 differs"):
        document_options(Toy)(lambda path, rank=4: None)


def test_generate_has_a_real_signature():
    from ase_crystal_llm.generation.generator import CrystalGenerator
    from ase_crystal_llm.generation.options import GenerationOptions

    params = inspect.signature(CrystalGenerator.generate).parameters
    assert not any(p.kind is p.VAR_KEYWORD for p in params.values())
    assert set(params) - {"self", "n"} == {f.name for f in fields(GenerationOptions)}
    assert "max_attempts : int" in CrystalGenerator.generate.__doc__


def test_every_option_has_help():
    from ase_crystal_llm.generation.options import GenerationOptions
    from ase_crystal_llm.model.config import TrainConfig, TrainRunOptions

    for cls in (TrainConfig, TrainRunOptions, GenerationOptions):
        assert all(f.metadata.get("help") for f in fields(cls)), cls
