"""Shared fixtures.  Tests never reach the network: the hub is switched off here,
before anything imports transformers or huggingface_hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from ase_crystal_llm import settings  # noqa: E402


def _need(what):
    """Data-dependent tests fail (not skip) under CI=true when data is missing."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{what} is missing under CI: set CRYSTAL_LLM_DATA")
    pytest.skip(f"{what} not available (set CRYSTAL_LLM_DATA)")


@pytest.fixture(scope="session")
def data_dir():
    path = settings.data_dir(required=False)
    if path is None or not (path / "mp_20").is_dir():
        _need("the shared data folder")
    return path


@pytest.fixture(scope="session")
def m3gnet_dir(data_dir):
    try:
        return settings.m3gnet_dir()
    except FileNotFoundError:
        _need("the M3GNet model directory")


@pytest.fixture(scope="session")
def mp20_test_sample(data_dir):
    """The first 200 MP-20 test structures (canonical cells), read once per session."""
    from ase_crystal_llm.datasets import read_structures

    return read_structures(data_dir / "mp_20" / "test.csv.gz", limit=200)
