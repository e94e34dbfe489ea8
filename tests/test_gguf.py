"""GGUF bases: resolving names, files and folders; LoRA on a GGUF base; adapter reload, merge, base checks;
resume to extend a run; a byte-level BPE tokenizer through the crystal grammar."""

import json
import os

import numpy as np
import pytest
import torch

from ase_crystal_llm import settings
from ase_crystal_llm.generation.generator import CrystalGenerator
from ase_crystal_llm.generation.infill import propose_elements
from ase_crystal_llm.model.encoding import encode_example
from ase_crystal_llm.model.loading import load_trained, merge_adapter, resolve_base
from ase_crystal_llm.model.modelcard import ModelCardError, sha256_file
from ase_crystal_llm.model.training import LOG_NAME, train
from ase_crystal_llm.text.format import text_to_atoms
from ase_crystal_llm.text.prompts import PromptTemplate, make_example

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_thread")


def write_tiny_gguf(path, *, hidden=32, layers=2, heads=2, ffn=64, seed=0):
    """A random 2-layer LLaMA with a byte-level BPE tokenizer (SmolLM2's kind), written as GGUF.

    The merges make multi-character tokens that cross the grammar's boundaries
    (``"Ġ0"``: a separator and a digit) and a symbol token (``"Na"``) that has a
    shorter symbol (``"N"``) as a prefix.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["N a", "C l", "Ġ 0", "0 ."]
    tokens = specials + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in merges]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(1024)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    rng = np.random.default_rng(seed)

    def tensor(name, *shape):
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    tensor("token_embd.weight", len(tokens), hidden)
    for i in range(layers):
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            tensor(f"blk.{i}.{name}.weight", hidden, hidden)
        tensor(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_up.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ffn)
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    tensor("output.weight", len(tokens), hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def gguf_base(tmp_path_factory):
    # 64 wide: on CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for eval-mode forwards and
    # fails on layers narrower than its 64-value quantisation block (the QLoRA test would meet it).
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf", hidden=64, ffn=128)


@pytest.fixture(scope="module")
def crystals(mp20_train_64):
    return mp20_train_64[:16]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, gguf_base, crystals):
    out = tmp_path_factory.mktemp("gguf-lora") / "adapter"
    train(crystals, out, base=str(gguf_base), max_steps=4, batch_size=4, lr=5e-3, progress=False)
    return out


# -- resolving bases ------------------------------------------------------------------------------


def test_resolve_file_folder_and_errors(tmp_path, gguf_base):
    assert resolve_base(str(gguf_base)) == str(gguf_base.resolve())
    assert resolve_base(str(gguf_base.parent)) == str(gguf_base.resolve())  # a folder holding one
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="2 .gguf files.*a.gguf, b.gguf"):
        resolve_base(str(two))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="not a .gguf file"):
        resolve_base(str(tmp_path / "notes.txt"))
    with pytest.raises(FileNotFoundError, match="neither config.json nor a .gguf"):
        resolve_base(str(tmp_path / "two" / ".." / ".."))


def test_named_base_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(settings.NAMED_BASES, "nowhere-1m", ("no_such_pkg_xyz", "x.gguf", "pip install no-such"))
    with pytest.raises(FileNotFoundError, match="'nowhere-1m' is not installed: pip install no-such"):
        resolve_base("nowhere-1m")
    assert settings.named_base_file("not-a-name") is None


def test_named_base_resolves_to_the_installed_file(monkeypatch, gguf_base):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: type("Spec", (), {"origin": str(gguf_base)}))
    monkeypatch.setitem(settings.NAMED_BASES, "tiny-llama", ("tiny_pkg", gguf_base.name, "pip install tiny"))
    assert resolve_base("tiny-llama") == str(gguf_base)


# -- LoRA on a GGUF base --------------------------------------------------------------------------


def test_lora_card_records_the_base_file(adapter, gguf_base):
    card = json.loads((adapter / "crystal_llm.json").read_text())
    assert card["kind"] == "lora" and card["base_model"] == str(gguf_base.resolve())
    assert card["extra"]["base"] == {"name": str(gguf_base.resolve()), "file": gguf_base.name,
                                     "sha256": sha256_file(gguf_base)}  # fmt: skip
    assert (adapter / "tokenizer.json").is_file()  # the GGUF's tokenizer, saved as a normal one


def test_adapter_reloads_generates_and_scores(adapter):
    gen = CrystalGenerator.from_pretrained(adapter, device="cpu")
    # With max_atoms=1 the grammar must close every row after one atom, so an
    # untrained model still writes complete crystal text through the BPE tokens.
    crystals = gen.generate(4, seed=0, max_atoms=1, max_attempts=4, min_distance=None)
    stats = gen.stats
    assert stats.attempts >= 4 and not stats.parse_failures.get("truncated")
    for atoms in crystals:
        text = atoms.info["generated_text"].replace(" | ", "\n")
        assert len(atoms) == 1 and gen.grammar().accepts(text)
    scores = propose_elements(gen, _rocksalt(), "Na", candidates=["N", "Na", "K"])
    assert set(scores) == {"N", "Na", "K"} and abs(sum(scores.values()) - 1) < 1e-6


def test_merge_and_wrong_base_file(adapter, tmp_path, gguf_base):
    merged = merge_adapter(adapter, tmp_path / "merged")
    assert merged.kind == "full"
    full, _, _ = load_trained(tmp_path / "merged")
    lora, tokenizer, _ = load_trained(adapter)
    x = tokenizer("Na 0.50", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(full(input_ids=x).logits, lora(input_ids=x).logits, atol=1e-4)
    other = write_tiny_gguf(tmp_path / "other.gguf", seed=1)
    with pytest.raises(ModelCardError, match="not the one this adapter was trained on"):
        load_trained(adapter, base=str(other))


def _rocksalt():
    from ase.build import bulk

    return bulk("NaCl", "rocksalt", a=5.64)


# -- byte-level BPE tokenizers and the text format -----------------------------------------------


@pytest.fixture(scope="module", params=["tiny-gguf", "smollm2-135m"])
def bpe_tokenizer(request, adapter):
    """The tiny GGUF's tokenizer, and SmolLM2's real one (49,152 tokens) when its package is installed."""
    from transformers import AutoTokenizer

    from ase_crystal_llm.model.loading import load_base_tokenizer

    if request.param == "tiny-gguf":
        return AutoTokenizer.from_pretrained(adapter)
    try:
        return load_base_tokenizer("smollm2-135m")
    except FileNotFoundError as err:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{err} (the README's install installs it)")
        pytest.skip(str(err))


def test_bpe_tokenizer_keeps_prompt_answer_and_eos(bpe_tokenizer, crystals):
    tok = bpe_tokenizer
    template = PromptTemplate()
    for i, atoms in enumerate(crystals[:9]):  # generation and infill examples, with conditions
        example = make_example(atoms, template, seed=0, epoch=0, index=i)
        ids, n_prompt = encode_example(tok, example.prompt, example.answer)
        assert tok.decode(ids[:n_prompt], skip_special_tokens=True) == example.prompt
        assert tok.decode(ids[n_prompt:], skip_special_tokens=True) == example.answer
        assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]


def test_bpe_grammar_allows_every_token_of_real_crystals(bpe_tokenizer, crystals):
    from ase_crystal_llm.generation.constraints import START, CrystalGrammar
    from ase_crystal_llm.text.format import ELEMENTS, atoms_to_text

    tok = bpe_tokenizer
    grammar = CrystalGrammar(tok)
    for atoms in crystals[:6]:
        text = atoms_to_text(atoms)
        state, n_atoms = START, 0
        for token in tok(text, add_special_tokens=False)["input_ids"]:
            assert grammar.allowed(state, n_atoms)[token], (text, tok.decode([token]))
            state, n_atoms = grammar.advance(state, n_atoms, token)
        assert grammar.allowed(state, n_atoms)[tok.eos_token_id]  # may end after the last atom
        assert n_atoms == len(atoms) == len(text_to_atoms(text))
    # every element can be written, so any formula can be held (FormulaTarget checks it)
    assert grammar.target("".join(ELEMENTS[:40])) is not None


# -- resume to extend -----------------------------------------------------------------------------


def test_resume_with_more_steps_extends_the_run(tmp_path, crystals):
    kwargs = dict(from_scratch="tiny", batch_size=4, save_every=2, seed=3, progress=False)
    long = tmp_path / "long"
    train(crystals, long, max_steps=8, warmup_steps=2, **kwargs)
    short = tmp_path / "short"
    train(crystals, short, max_steps=4, warmup_steps=2, **kwargs)
    with pytest.raises(ValueError, match="below the checkpoint's step 4"):
        train(crystals, short, max_steps=3, warmup_steps=2, resume=True, **kwargs)
    card = train(crystals, short, max_steps=8, warmup_steps=2, resume=True, **kwargs)
    log = json.loads((short / LOG_NAME).read_text())
    long_log = json.loads((long / LOG_NAME).read_text())
    assert [s["step"] for s in log["steps"]] == list(range(1, 9))
    assert log["extensions"] == [{"at_step": 4, "from_total_steps": 4, "to_total_steps": 8}]
    assert card.hyperparameters["max_steps"] == 8
    # after the extension the cosine schedule is the 8-step one, so steps 5-8 match a run planned for 8
    assert np.allclose([s["lr"] for s in log["steps"][4:]], [s["lr"] for s in long_log["steps"][4:]])
    # the first 4 steps decayed towards 0 over 4 steps: a different (shorter) schedule
    assert log["steps"][3]["lr"] < long_log["steps"][3]["lr"]


def test_checkpoints_load_like_the_final_model(adapter, tmp_path, crystals):
    from ase_crystal_llm.model.loading import checkpoints, load_base_model, load_checkpoint

    last = checkpoints(adapter)[-1]
    assert last.name == "step-0000004"
    model, tokenizer, state = load_checkpoint(last)
    final, _, _ = load_trained(adapter)
    x = tokenizer("Na 0.50", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x).logits, final(input_ids=x).logits, atol=1e-4)
    assert state["step"] == 4 and state["fingerprint"]["batch_size"] == 4
    # A base loaded once serves every checkpoint of a curve, and merging into it leaves it untouched.
    base = load_base_model(state["fingerprint"]["base"])
    before = {k: v.clone() for k, v in base.state_dict().items()}
    for _ in range(2):
        shared = load_checkpoint(last, base_model=base)[0]
        with torch.no_grad():
            assert torch.allclose(shared(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    scratch = tmp_path / "scratch"
    train(crystals[:8], scratch, from_scratch="tiny", max_steps=2, batch_size=4, save_every=1, keep_checkpoints=0,
          progress=False)
    assert [p.name for p in checkpoints(scratch)] == ["step-0000001", "step-0000002"]
    assert type(load_checkpoint(checkpoints(scratch)[0])[0]).__name__ == "LlamaForCausalLM"


def test_qlora_on_a_gguf_base(tmp_path, monkeypatch, gguf_base, crystals):
    """transformers refuses a bitsandbytes config while reading GGUF: the base is dequantised once into the cache."""
    pytest.importorskip("bitsandbytes")
    monkeypatch.setenv("CRYSTAL_LLM_CACHE", str(tmp_path / "cache"))
    card = train(crystals[:8], tmp_path / "qlora", base=str(gguf_base), quantize="4bit", max_steps=2, batch_size=4,
                 progress=False)  # fmt: skip
    assert card.quantization == "4bit" and card.extra["base"]["sha256"] == sha256_file(gguf_base)
    assert len(list((tmp_path / "cache" / "gguf").iterdir())) == 1  # one dequantised copy, reused
    model, _, _ = load_trained(tmp_path / "qlora", quantize="4bit")
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
