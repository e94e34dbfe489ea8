"""Shared fixtures.  Tests never reach the network: the hub is switched off here,
before anything imports transformers or huggingface_hub."""

import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from ase_crystal_llm import settings  # noqa: E402

# -- markers: the fast lane ------------------------------------------------------------
# ``python -m pytest`` runs every test.  ``python -m pytest -m fast`` runs the quick part:
# the tests that carry none of HEAVY_MARKERS (the same as
# ``-m "not slow and not data and not potential and not subprocess and not postgres"``).
# ``data``, ``potential`` and (for a model trained in the session) ``slow`` are set here from
# the fixtures a test uses, directly or through other fixtures; ``subprocess``, ``slow`` and
# ``postgres`` are set in the test modules, as is ``potential`` for potentials that come with
# their wheel (CHGNet, SevenNet).  ``slow`` marks tests of more than about 1.5 s on a 2-core
# machine with one core busy; the fast lane then takes under a minute there.
HEAVY_MARKERS = ("slow", "data", "potential", "subprocess", "postgres")
DATA_FIXTURES = {"data_dir"}  # every shared-data fixture (m3gnet_dir, mp20_*, tiny_model_dir) depends on it
POTENTIAL_FIXTURES = {"m3gnet_dir"}
SLOW_FIXTURES = {"crystal_model"}  # trains a model for the session (seconds)


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects anything
def pytest_collection_modifyitems(config, items):
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & DATA_FIXTURES:
            item.add_marker(pytest.mark.data)
        if used & POTENTIAL_FIXTURES:
            item.add_marker(pytest.mark.potential)
        if used & SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)
        if not any(item.get_closest_marker(name) for name in HEAVY_MARKERS):
            item.add_marker(pytest.mark.fast)


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
    from ase_crystal_llm.data.datasets import read_structures

    return read_structures(data_dir / "mp_20" / "test.csv.gz", limit=200)


@pytest.fixture(scope="session")
def mp20_train_64(data_dir):
    """The first 64 MP-20 training structures (canonical cells)."""
    from ase_crystal_llm.data.datasets import read_structures

    return read_structures(data_dir / "mp_20" / "train.csv.gz", limit=64)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, mp20_train_64):
    """A ``tiny`` from-scratch model trained on 64 MP-20 crystals for 60 steps.

    A real model directory (weights, tokenizer, ``crystal_llm.json``,
    ``training_log.json``) for generation and infill tests; it knows the text
    format only roughly.  One torch thread: far faster than two on a busy CPU.
    """
    out = tmp_path_factory.mktemp("tiny_model") / "model"
    _train_tiny(mp20_train_64, out, max_steps=60)
    return out


@pytest.fixture(scope="session")
def crystal_model(tmp_path_factory):
    """A ``tiny`` model over-fitted on four simple crystals: it writes valid crystal text.

    (``tiny_model_dir`` knows the format only roughly, too rarely for a run
    that must produce rows before it is killed.)
    """
    from ase.build import bulk

    crystals = [bulk("NaCl", "rocksalt", a=5.64), bulk("Si", "diamond", a=5.43), bulk("Cu", "fcc", a=3.6),
                bulk("MgO", "rocksalt", a=4.2)] * 16
    out = tmp_path_factory.mktemp("overfit_model") / "model"
    # A seed and normaliser whose 120 steps write these crystals well (checked, not general).
    _train_tiny(crystals, out, max_steps=120, seed=2, loss_normaliser="batch")
    return str(out)


def _train_tiny(structures, out, max_steps, **options):
    from ase_crystal_llm.model.training import train

    with one_torch_thread():
        train(structures, out, from_scratch="tiny", max_steps=max_steps, batch_size=8, lr=3e-3,
              save_every=max_steps, cache=False, progress=False, **options)


@contextlib.contextmanager
def one_torch_thread():
    """Tiny models: one torch thread is far faster than two on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    """The project's from-scratch tokenizer for the default prompt template."""
    from ase_crystal_llm.text.prompts import PromptTemplate
    from ase_crystal_llm.text.tokenizer import tokenizer_for_template

    return tokenizer_for_template(PromptTemplate())


@pytest.fixture(scope="module")
def one_thread():
    with one_torch_thread():
        yield
