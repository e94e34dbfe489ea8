"""The thread rule: one thread for small models, idle cores otherwise; --threads on every command."""

import os

import pytest
import torch

from ase_crystal_llm import settings
from ase_crystal_llm.cli import build_parser


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)


@pytest.mark.parametrize("load, idle", [(0.0, 2), (0.4, 2), (0.6, 1), (1.0, 1), (7.5, 1)])
def test_idle_cores_is_cores_minus_load(monkeypatch, two_cores, load, idle):
    monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
    assert settings.idle_cores() == idle


def test_small_models_decode_on_one_thread(monkeypatch, two_cores):
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert settings.default_threads(2_700_000) == 1
    assert settings.default_threads(135_000_000) == 2  # a larger model uses the idle cores
    assert settings.default_threads() == 2  # potentials, training


def test_torch_threads_restores_the_setting():
    before = torch.get_num_threads()
    with settings.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with settings.torch_threads(None):
        assert torch.get_num_threads() == before


def test_generator_threads(tiny_model_dir):
    from ase_crystal_llm.generation.generator import CrystalGenerator

    assert CrystalGenerator.from_pretrained(tiny_model_dir, device="cpu").threads == 1
    gen = CrystalGenerator.from_pretrained(tiny_model_dir, device="cpu", threads=2)
    assert gen.threads == 2
    before = torch.get_num_threads()
    gen.generate(2, seed=0, max_attempts=1, min_distance=None)
    assert torch.get_num_threads() == before  # decoding does not leave its setting behind


@pytest.mark.parametrize("command", ["train", "generate", "evaluate", "mutate", "merge"])
def test_every_model_command_takes_threads(command):
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    option = next(a for a in sub._actions if "--threads" in a.option_strings)
    assert "idle core" in option.help
