"""Safe loading: weights are data, model cards are data, nobody's code runs on load.

* weights come only from safetensors or ``torch.load(weights_only=True)``;
* ``trust_remote_code`` is never switched on by the package;
* the model card is JSON, read with ``json`` only.

The source scan pins the rules for code written later; the behaviour tests
hand the loader a model directory that tries to run code and check it never
does.
"""

import ast
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import ase_crystal_llm

PACKAGE = Path(ase_crystal_llm.__file__).resolve().parent
SOURCES = sorted(PACKAGE.rglob("*.py"))
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "joblib", "marshal", "shelve", "cloudpickle"}


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func):
    """Dotted name of a call target (``torch.load``, ``np.load``, ``eval``)."""
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _keyword(call, name):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _is_true(node):
    return isinstance(node, ast.Constant) and node.value is True


def _is_false(node):
    return isinstance(node, ast.Constant) and node.value is False


@pytest.fixture(scope="module")
def trees():
    return {path.relative_to(PACKAGE.parent): ast.parse(path.read_text(), str(path)) for path in SOURCES}


def test_sources_found(trees):
    assert any(str(p).endswith("cli.py") for p in trees)


def test_torch_load_only_weights_only(trees):
    bad = [f"{p}:{c.lineno}" for p, t in trees.items() for c in _calls(t)
           if _name(c.func).endswith("torch.load") and not _is_true(_keyword(c, "weights_only"))]
    assert not bad, f"torch.load without weights_only=True: {bad}"


def test_numpy_load_never_unpickles(trees):
    bad = [f"{p}:{c.lineno}" for p, t in trees.items() for c in _calls(t)
           if _name(c.func) in ("np.load", "numpy.load") and _keyword(c, "allow_pickle") is not None
           and not _is_false(_keyword(c, "allow_pickle"))]
    assert not bad, f"np.load with allow_pickle (numpy's default False is the only safe value): {bad}"


def test_trust_remote_code_never_on(trees):
    bad = [f"{p}:{c.lineno}" for p, t in trees.items() for c in _calls(t)
           if (v := _keyword(c, "trust_remote_code")) is not None and not _is_false(v)]
    assert not bad, f"trust_remote_code set (only an explicit False is allowed): {bad}"


def test_no_unpickling_or_eval(trees):
    bad = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                bad += [f"{path}:{node.lineno} import {a.name}" for a in node.names if a.name in UNSAFE_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "") in UNSAFE_MODULES:
                bad.append(f"{path}:{node.lineno} from {node.module}")
        bad += [f"{path}:{c.lineno} {_name(c.func)}()" for c in _calls(tree)
                if (isinstance(c.func, ast.Name) and c.func.id in ("eval", "exec", "compile", "__import__"))
                or _name(c.func) in ("yaml.load", "yaml.unsafe_load", "torch.jit.load")]
    assert not bad, f"code execution from data: {bad}"


def test_model_card_read_as_json(tmp_path):
    """A card that is Python, not JSON, is refused with a clear error."""
    from ase_crystal_llm.model.modelcard import CARD_NAME, ModelCard

    marker = tmp_path / "ran"
    (tmp_path / CARD_NAME).write_text(f"__import__('pathlib').Path({str(marker)!r}).touch()\n")
    with pytest.raises(ValueError, match="model card"):
        ModelCard.from_pretrained(tmp_path)
    assert not marker.exists()


# -- a model directory that tries to run code --------------------------------------

class _Payload:
    """Unpickling this creates a file: proof that a pickle ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.fixture(scope="module")
def tiny_full_model(tmp_path_factory):
    """A one-layer from-scratch LLaMA with the package's tokenizer and a card."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ase_crystal_llm.model.modelcard import ModelCard
    from ase_crystal_llm.text.tokenizer import build_tokenizer

    path = tmp_path_factory.mktemp("tiny_full")
    tok = build_tokenizer(["5.0 5.0 5.0\n90 90 90\nNa\n0.00 0.00 0.00"])
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    card = ModelCard(kind="full", base_model="from-scratch:test")
    card.record_weights(path)
    card.save_pretrained(path)
    return path


def _copy(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _record(path):
    from ase_crystal_llm.model.modelcard import ModelCard

    card = ModelCard.from_pretrained(path)
    card.record_weights(path)
    card.save_pretrained(path)


def test_tiny_model_loads(tiny_full_model):
    """The clean directory loads (else the refusals below prove nothing)."""
    from ase_crystal_llm.generation.generator import CrystalGenerator

    gen = CrystalGenerator.from_pretrained(tiny_full_model, device="cpu")
    assert gen.model.config.num_hidden_layers == 1


@pytest.mark.subprocess
def test_pickled_weights_never_run(tiny_full_model, tmp_path):
    """Weights as a code-carrying pickle (card hashes updated to match) are refused, never executed."""
    from ase_crystal_llm.generation.generator import CrystalGenerator

    model = _copy(tiny_full_model, tmp_path / "model")
    marker = tmp_path / "pickle-ran"
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(pickle.dumps({"lm_head.weight": _Payload(marker)}, protocol=2))
    _record(model)
    with pytest.raises(pickle.UnpicklingError):  # torch.load(weights_only=True) refuses the payload
        CrystalGenerator.from_pretrained(model, device="cpu")
    assert not marker.exists(), "loading a model directory executed a pickle"

    out = tmp_path / "out.extxyz"
    proc = subprocess.run([sys.executable, "-m", "ase_crystal_llm.cli", "generate", "-n", "1", "-o", str(out),
                           "--model", str(model), "--device", "cpu"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists(), "the CLI executed a pickle"


def test_remote_code_never_imported(tiny_full_model, tmp_path):
    """A model directory asking for its own Python code (auto_map) is loaded with the library's code only."""
    from ase_crystal_llm.generation.generator import CrystalGenerator

    model = _copy(tiny_full_model, tmp_path / "model")
    marker = tmp_path / "remote-code-ran"
    code = f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nfrom transformers import *\n"
    for name in ("evil_modeling.py", "evil_config.py", "evil_tokenizer.py"):
        (model / name).write_text(code)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil_config.EvilConfig",
                          "AutoModelForCausalLM": "evil_modeling.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((model / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": [None, "evil_tokenizer.EvilTokenizer"]}
    (model / "tokenizer_config.json").write_text(json.dumps(tok_config))
    try:
        CrystalGenerator.from_pretrained(model, device="cpu")
    except Exception:  # refusing is fine too; running the code is not
        pass
    assert not marker.exists(), "loading a model directory imported its Python code"
