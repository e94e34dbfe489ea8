"""Training: labels, batching, from-scratch, LoRA, QLoRA on CPU, exact resume, data parallel, CLI errors."""

import json
import os
import shutil
import subprocess
import sys
import warnings

import ase.io
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ase_crystal_llm.cli import main
from ase_crystal_llm.model.config import SIZES
from ase_crystal_llm.model.encoding import IGNORE_INDEX, EpochData, collate, encode_example
from ase_crystal_llm.model.loading import load_trained, merge_adapter
from ase_crystal_llm.model.modelcard import CARD_NAME, DEFAULT_SAMPLING, ModelCard, ModelCardError
from ase_crystal_llm.model.training import LOG_NAME, train
from ase_crystal_llm.text.prompts import PromptTemplate, make_example

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def crystals(mp20_train_64):
    return mp20_train_64[:24]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, tok):
    """A randomly initialised tiny LlamaForCausalLM saved like a hub model."""
    from transformers import LlamaForCausalLM

    from ase_crystal_llm.model.config import scratch_config

    path = tmp_path_factory.mktemp("tiny-base")
    torch.manual_seed(0)
    LlamaForCausalLM(scratch_config("tiny", tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def losses(model_dir):
    return [s["loss"] for s in json.loads((model_dir / LOG_NAME).read_text())["steps"]]


# -- labels and batches -----------------------------------------------------------------------


def test_labels_mask_exactly_the_prompt(tok, crystals):
    t = PromptTemplate()
    examples = [make_example(a, t, seed=0, epoch=0, index=i) for i, a in enumerate(crystals[:6])]
    encoded = [encode_example(tok, e.prompt, e.answer) for e in examples]
    batch = collate(encoded, pad_id=tok.eos_token_id)  # EOS doubling as padding
    for row, ((ids, n_prompt), ex) in enumerate(zip(encoded, examples)):
        labels = batch["labels"][row]
        assert tok.decode(ids[:n_prompt], skip_special_tokens=True) == ex.prompt
        assert tok.decode(ids[n_prompt:], skip_special_tokens=True) == ex.answer
        assert (labels[:n_prompt] == IGNORE_INDEX).all()
        assert labels[n_prompt : len(ids)].tolist() == ids[n_prompt:].tolist()
        assert labels[len(ids) - 1] == tok.eos_token_id  # EOS kept although it is the pad id
        assert (labels[len(ids) :] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].sum() == len(ids)


def test_epoch_batches_are_deterministic_and_length_bucketed(tok, crystals):
    structures = crystals * 8  # 192 examples
    kwargs = dict(batch_size=8, infill_fraction=1 / 3, max_length=None)
    a = EpochData(structures, tok, PromptTemplate(), seed=1, epoch=0, **kwargs)
    b = EpochData(structures, tok, PromptTemplate(), seed=1, epoch=0, **kwargs)
    c = EpochData(structures, tok, PromptTemplate(), seed=1, epoch=1, **kwargs)
    assert [x.tolist() for x in a.batches] == [x.tolist() for x in b.batches]
    assert all((x == y).all() for x, y in zip(a.ids, b.ids))
    assert [x.tolist() for x in a.batches] != [x.tolist() for x in c.batches]
    assert sorted(np.concatenate(a.batches).tolist()) == list(range(len(structures)))
    padded = sum(len(batch) * a.lengths[batch].max() for batch in a.batches)
    assert a.lengths.sum() / padded > 0.9  # bucketing keeps padding small


def test_mean_labels_is_the_epochs_mean_count_per_batch(tok, crystals):
    data = EpochData(crystals * 4, tok, PromptTemplate(), seed=1, epoch=0, batch_size=10,
                     infill_fraction=1 / 3, max_length=None)  # fmt: skip
    labelled = [int((collate(data.batch(j), tok.eos_token_id)["labels"][:, 1:] != IGNORE_INDEX).sum())
                for j in range(len(data.batches))]  # fmt: skip
    assert len(set(labelled)) > 1  # bucketed batches differ in their token counts
    assert data.mean_labels("per_token") == pytest.approx(np.mean(labelled))
    assert data.mean_labels("per_example") == pytest.approx(len(crystals) * 4 / len(data.batches))


# -- the loss ---------------------------------------------------------------------------------


def _lora_tiny(tiny_base):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(tiny_base), lora)
    return model.eval()


@pytest.mark.parametrize("averaging", ["per_token", "per_example"])
def test_answer_only_logits_give_the_full_forward_loss_and_gradients(tok, crystals, tiny_base, averaging):
    from ase_crystal_llm.model.loss import AnswerLoss, answer_loss_for, token_weights

    t = PromptTemplate()
    examples = [make_example(a, t, seed=0, epoch=0, index=i, infill_fraction=0.5) for i, a in enumerate(crystals[:6])]
    assert {e.task for e in examples} == {"generation", "infill"}
    batch = collate([encode_example(tok, e.prompt, e.answer) for e in examples], pad_id=tok.eos_token_id)
    weights = token_weights(batch["labels"], averaging)
    model = _lora_tiny(tiny_base)
    fast = answer_loss_for(model)
    assert fast.answer_only
    results = []
    for net in (fast, AnswerLoss(model, answer_only=False)):
        model.zero_grad()
        loss = net(batch["input_ids"], batch["labels"], weights)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(grads_a, grads_b))
    # by hand: the weighted cross-entropy of every labelled next token
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:],
                                           ignore_index=IGNORE_INDEX, reduction="none")  # fmt: skip
    assert loss_a == pytest.approx(float((ce * weights).sum()), rel=1e-5)


def test_a_head_that_is_more_than_a_linear_layer_keeps_the_full_forward(tiny_base):
    from transformers import LlamaForCausalLM

    from ase_crystal_llm.model.loss import answer_loss_for

    class ScaledLogits(LlamaForCausalLM):  # as Granite or Gemma-2 change the head's output
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    assert not answer_loss_for(ScaledLogits.from_pretrained(tiny_base)).answer_only
    assert answer_loss_for(LlamaForCausalLM.from_pretrained(tiny_base)).answer_only


# -- from scratch -----------------------------------------------------------------------------


def test_tiny_from_scratch_lowers_loss(tiny_model_dir):
    curve = losses(tiny_model_dir)
    assert len(curve) == 60
    assert np.mean(curve[-5:]) < np.mean(curve[:5]) - 1.0
    card = ModelCard.from_pretrained(tiny_model_dir)
    assert card.kind == "full" and card.base_model == "from-scratch:tiny"
    assert card.loss_averaging == "per_token" and card.cell_convention == "primitive-niggli"
    assert card.training_data["n_structures"] == 64 and len(card.training_data["sha256"]) == 64
    assert 50_000 <= card.hyperparameters["parameters"] <= 200_000
    assert card.final_losses["train_loss"] == curve[-1]
    assert card.template == PromptTemplate() and card.sampling == {"temperature": 0.7, "top_p": 0.9}
    assert set(card.weights) == {"model.safetensors"}
    card.verify_weights(tiny_model_dir)
    model, tokenizer, card2 = load_trained(tiny_model_dir)
    prompt = tokenizer(card.template.generation_prompt(), return_tensors="pt")
    assert model(**prompt).logits.shape[-1] == model.config.vocab_size
    for name in ("tokenizer.json", "config.json", "checkpoints"):
        assert (tiny_model_dir / name).exists()


def test_per_example_loss_and_validation(tmp_path, crystals):
    out = tmp_path / "m"
    card = train(crystals[:16], out, val=crystals[16:], from_scratch="tiny", max_steps=4, batch_size=8,
                 loss_averaging="per_example", eval_every=2, progress=False)  # fmt: skip
    log = json.loads((out / LOG_NAME).read_text())
    assert [e["step"] for e in log["eval"]] == [2, 4]
    assert card.loss_averaging == "per_example"
    assert card.final_losses["val_loss"] == log["eval"][-1]["val_loss"]
    assert card.validation_data["n_structures"] == 8
    for entry in log["steps"]:
        assert entry["tokens_per_s"] > 0 and entry["lr"] >= 0 and np.isfinite(entry["loss"])
        assert entry["grad_norm"] > 0  # before clipping, so it may exceed max_grad_norm


def test_runs_with_different_seeds_validate_on_the_same_examples(monkeypatch, tmp_path, crystals):
    from ase_crystal_llm.model import training

    built = []
    own = training._Trainer._val_batches

    def recorded(self):
        built.append(own(self))
        return built[-1]

    monkeypatch.setattr(training._Trainer, "_val_batches", recorded)
    for seed in (1, 2):
        train(crystals[:8], tmp_path / f"s{seed}", val=crystals[8:16], from_scratch="tiny", max_steps=1,
              batch_size=4, seed=seed, progress=False)  # fmt: skip
    first, second = ([b["input_ids"].tolist() for b in batches] for batches in built)
    assert first and first == second  # the same tasks, conditions and translations


def test_log_records_the_gradient_norm_before_clipping(tmp_path, crystals):
    clipped = tmp_path / "clipped"
    train(crystals[:8], clipped, from_scratch="tiny", max_steps=2, batch_size=4, max_grad_norm=1e-3, progress=False)
    norms = [e["grad_norm"] for e in json.loads((clipped / LOG_NAME).read_text())["steps"]]
    assert len(norms) == 2 and all(n > 1e-3 for n in norms)
    unclipped = tmp_path / "unclipped"
    train(crystals[:8], unclipped, from_scratch="tiny", max_steps=1, batch_size=4, max_grad_norm=0, progress=False)
    assert json.loads((unclipped / LOG_NAME).read_text())["steps"][0]["grad_norm"] is None


def test_cpu_runs_hand_freed_heap_pages_back(monkeypatch, tmp_path, crystals):
    from ase_crystal_llm.model import training

    trim = training._heap_trimmer()
    assert trim(0) in (0, 1)  # glibc on the Linux machines this package is tested on
    calls = []
    monkeypatch.setattr(training, "TRIM_EVERY", 2)
    monkeypatch.setattr(training, "_heap_trimmer", lambda: calls.append)
    train(crystals[:8], tmp_path / "m", from_scratch="tiny", max_steps=5, batch_size=4, progress=False)
    assert calls == [0, 0]  # after steps 2 and 4


@pytest.mark.parametrize("normaliser", ["epoch", "batch"])
def test_every_token_of_an_epoch_weighs_the_same(monkeypatch, tmp_path, tok, crystals, normaliser):
    """The divisor of each step's loss sum: the epoch's mean count ("epoch") or the step's own ("batch")."""
    from accelerate import Accelerator

    from ase_crystal_llm.model.loss import AnswerLoss

    sums, scaled = [], []  # each micro-batch's loss sum, and what was back-propagated
    forward, backward = AnswerLoss.forward, Accelerator.backward

    def recorded_forward(self, *args, **kwargs):
        sums.append(forward(self, *args, **kwargs))
        return sums[-1]

    def recorded_backward(self, loss, **kwargs):
        scaled.append(loss)
        return backward(self, loss, **kwargs)

    monkeypatch.setattr(AnswerLoss, "forward", recorded_forward)
    monkeypatch.setattr(Accelerator, "backward", recorded_backward)
    train(crystals, tmp_path / "m", from_scratch="tiny", max_steps=6, batch_size=4, seed=3,
          loss_normaliser=normaliser, progress=False)  # fmt: skip
    card = ModelCard.from_pretrained(tmp_path / "m")
    assert card.hyperparameters["loss_normaliser"] == normaliser
    divisors = [float(s.detach() / d.detach()) for s, d in zip(sums, scaled)]
    step_means = losses(tmp_path / "m")  # the log keeps each step's own mean either way
    own_counts = [float(s.detach()) / m for s, m in zip(sums, step_means)]
    data = EpochData(crystals, tok, card.template, seed=3, epoch=0, batch_size=4, infill_fraction=1 / 3,
                     max_length=None)  # 6 batches: the run's one epoch
    if normaliser == "epoch":
        assert divisors == pytest.approx([data.mean_labels("per_token")] * 6, rel=1e-5)
        assert len({round(c) for c in own_counts}) > 1
    else:
        assert divisors == pytest.approx(own_counts, rel=1e-4)


# -- LoRA and QLoRA ---------------------------------------------------------------------------


def test_lora_trains_reloads_and_merges(tmp_path, tiny_base, crystals):
    out = tmp_path / "adapter"
    card = train(crystals, out, base=str(tiny_base), max_steps=6, batch_size=4, lr=5e-3, progress=False)
    assert card.kind == "lora" and card.base_model == str(tiny_base.resolve())
    assert card.hyperparameters["lora_rank"] == 8 and card.hyperparameters["lora_alpha"] == 32
    assert set(card.hyperparameters["target_modules"]) >= {"q_proj", "v_proj", "down_proj"}
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert not (out / "model.safetensors").exists()
    weights = load_file(out / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # B moved off zero

    model, tokenizer, _ = load_trained(out)
    x = tokenizer(card.template.generation_prompt(), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        adapted = model(input_ids=x).logits
        with model.disable_adapter():
            plain = model(input_ids=x).logits
    assert not torch.allclose(adapted, plain)

    # the base moved to another machine: override its location
    moved = tmp_path / "moved-base"
    shutil.copytree(tiny_base, moved)
    model2, _, _ = load_trained(out, base=str(moved))
    with torch.no_grad():
        assert torch.allclose(model2(input_ids=x).logits, adapted, atol=1e-5)

    merged_dir = tmp_path / "merged"
    merged_card = merge_adapter(out, merged_dir, base=str(moved))
    assert merged_card.kind == "full" and (merged_dir / "model.safetensors").is_file()
    merged, _, _ = load_trained(merged_dir)
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=x).logits, adapted, atol=1e-4)


def test_adapter_continues_from_its_weights(tmp_path, tiny_base, crystals):
    first = tmp_path / "first"
    train(crystals, first, base=str(tiny_base), max_steps=6, batch_size=4, lr=5e-3, progress=False)
    tuned = {"temperature": 1.0, "top_p": 1.0, "conditioned": {"temperature": 0.7, "top_p": 0.9}}
    card = ModelCard.from_pretrained(first)
    card.sampling = tuned  # as chosen for the adapter after training (benchmarks/tune_sampling.py)
    card.save_pretrained(first)
    fresh = train(crystals, tmp_path / "fresh", base=str(tiny_base), max_steps=1, batch_size=4, lr=1e-9,
                  seed=1, progress=False)
    more = train(crystals, tmp_path / "more", base=str(tiny_base), adapter=str(first), max_steps=1, batch_size=4,
                 lr=1e-9, seed=1, progress=False)
    # Same data (seed 1) and a negligible step: only the starting weights differ, and the trained ones fit better.
    assert more.final_losses["train_loss"] < fresh.final_losses["train_loss"]
    assert more.extra["continued_from"]["adapter"] == str(first)
    assert more.extra["continued_from"]["steps"] == 6
    assert more.hyperparameters["adapter"] == str(first)
    assert more.sampling == tuned and fresh.sampling == DEFAULT_SAMPLING  # continued: the lineage's
    start = load_file(first / "adapter_model.safetensors")
    after = load_file(tmp_path / "more" / "adapter_model.safetensors")
    assert max(float((start[k] - after[k]).abs().max()) for k in start) < 1e-5

    assert more.template == PromptTemplate()  # the adapter's own wording, unless told otherwise
    reworded = PromptTemplate(max_conditions=5, sentences={"spacegroup": "Group {symbol}. "})
    other = train(crystals[:8], tmp_path / "reworded", base=str(tiny_base), adapter=str(first), template=reworded,
                  max_steps=1, batch_size=4, progress=False)  # fmt: skip
    assert other.template == reworded

    with pytest.raises(ValueError, match="lora_rank 8, not 4"):
        train(crystals, tmp_path / "rank", base=str(tiny_base), adapter=str(first), lora_rank=4, max_steps=1)
    with pytest.raises(ValueError, match="--adapter.*--base"):
        train(crystals, tmp_path / "scratch", from_scratch="tiny", adapter=str(first), max_steps=1)


def test_default_precision_follows_the_hardware(monkeypatch):
    from ase_crystal_llm.model import training
    from ase_crystal_llm.model.config import TrainConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(training, "cpu_computes_bf16", lambda: True)
    assert training._default_precision(TrainConfig(base="some/base")) == "bf16"
    assert training._default_precision(TrainConfig(base="some/base", quantize="4bit")) == "no"
    assert training._default_precision(TrainConfig(from_scratch="tiny")) == "no"
    monkeypatch.setattr(training, "cpu_computes_bf16", lambda: False)
    assert training._default_precision(TrainConfig(base="some/base")) == "no"


def test_precision_is_chosen_and_recorded(tmp_path, tiny_base, crystals):
    """Two runs in one process with different precisions (accelerate keeps one state per process)."""
    for precision in ("bf16", "no"):
        card = train(crystals[:8], tmp_path / precision, base=str(tiny_base), max_steps=1, batch_size=4,
                     precision=precision, progress=False)
        assert card.hyperparameters["mixed_precision"] == precision
        assert np.isfinite(card.final_losses["train_loss"])


@pytest.mark.parametrize("bits, layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_quantized_lora_on_cpu(tmp_path, tiny_base, crystals, bits, layer):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        card = train(crystals[:8], out, base=str(tiny_base), quantize=bits, max_steps=3, batch_size=4,
                     progress=False)  # fmt: skip
    assert any("CPU" in str(w.message) for w in caught)
    assert card.quantization == bits and card.kind == "lora"
    assert all(np.isfinite(losses(out)))
    model, _, _ = load_trained(out, quantize=bits)
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == layer


# -- checkpoints and resume -------------------------------------------------------------------


class Kill(Exception):
    pass


def _kill_at(step):
    def callback(done, entry):
        if done == step:
            raise Kill

    return callback


def test_resume_that_ends_at_the_checkpoint_still_validates(tmp_path, crystals):
    # Stopping a run early: kill it, then resume with --max-steps at its last checkpoint.
    kwargs = dict(from_scratch="tiny", batch_size=4, save_every=2, eval_every=5, seed=5, progress=False)
    run = tmp_path / "run"
    with pytest.raises(Kill):
        train(crystals, run, val=crystals[:4], max_steps=6, callbacks=[_kill_at(3)], **kwargs)
    card = train(crystals, run, val=crystals[:4], max_steps=2, resume=True, **kwargs)
    log = json.loads((run / "training_log.json").read_text())
    assert [e["step"] for e in log["eval"]] == [2] and card.final_losses["val_loss"] == log["eval"][0]["val_loss"]
    assert log["extensions"] == [{"at_step": 2, "from_total_steps": 6, "to_total_steps": 2}]


def test_kill_and_resume_reproduces_the_loss_curve(tmp_path, crystals):
    kwargs = dict(from_scratch="tiny", max_steps=8, batch_size=4, save_every=3, seed=5, progress=False)
    full = tmp_path / "full"
    train(crystals, full, **kwargs)
    part = tmp_path / "part"
    with pytest.raises(Kill):
        train(crystals, part, callbacks=[_kill_at(5)], **kwargs)
    assert not (part / CARD_NAME).exists()  # killed: no final model
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["step-0000003"]
    with pytest.raises(FileExistsError, match="--resume"):
        train(crystals, part, **kwargs)
    train(crystals, part, resume=True, **kwargs)
    assert np.allclose(losses(part), losses(full), rtol=1e-5, atol=1e-6)
    a, b = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # checkpoint states load without pickle
    ckpt = part / "checkpoints" / "step-0000008"
    for name in ("optimizer.pt", "scheduler.pt", "rng-0.pt"):
        torch.load(ckpt / name, weights_only=True)


def test_resume_rejects_another_configuration(tmp_path, crystals):
    out = tmp_path / "m"
    train(crystals[:8], out, from_scratch="tiny", max_steps=2, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="another configuration.*lr"):
        train(crystals[:8], out, from_scratch="tiny", max_steps=2, batch_size=4, lr=1e-2, resume=True,
              progress=False)  # fmt: skip
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(crystals[:8], tmp_path / "new", from_scratch="tiny", max_steps=2, resume=True, progress=False)


def test_checkpoints_from_before_the_normaliser_choice_resume_as_batch(tmp_path, crystals):
    from ase_crystal_llm.model.loading import STATE_NAME

    out = tmp_path / "m"
    kwargs = dict(from_scratch="tiny", batch_size=4, save_every=2, progress=False)
    with pytest.raises(Kill):
        train(crystals[:8], out, max_steps=4, loss_normaliser="batch", callbacks=[_kill_at(3)], **kwargs)
    state_file = out / "checkpoints" / "step-0000002" / STATE_NAME
    state = json.loads(state_file.read_text())
    del state["fingerprint"]["loss_normaliser"]  # as written before the choice existed
    state_file.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="another configuration.*loss_normaliser"):
        train(crystals[:8], out, max_steps=4, resume=True, **kwargs)
    card = train(crystals[:8], out, max_steps=4, loss_normaliser="batch", resume=True, **kwargs)
    assert card.hyperparameters["loss_normaliser"] == "batch"


def test_full_finetune_continues_a_model_and_resumes(tmp_path, tiny_model_dir, crystals):
    kwargs = dict(base=str(tiny_model_dir), full=True, max_steps=5, batch_size=4, save_every=2, seed=1,
                  progress=False)  # fmt: skip
    out = tmp_path / "full"
    card = train(crystals, out, **kwargs)
    assert card.kind == "full" and card.base_model == str(tiny_model_dir.resolve())
    assert card.hyperparameters["parameters"] == ModelCard.from_pretrained(tiny_model_dir).hyperparameters["parameters"]
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(before) == set(after) and all(not torch.equal(before[k], after[k]) for k in before)
    # starts from the trained weights: its first loss is far below a fresh tiny model's
    assert losses(out)[0] < losses(tiny_model_dir)[0] - 1.0
    model, tokenizer, _ = load_trained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert "local_files_only" not in json.loads((out / "tokenizer_config.json").read_text())
    # a base trained here keeps its own prompt wording
    custom = tmp_path / "custom-base"
    shutil.copytree(tiny_model_dir, custom, ignore=shutil.ignore_patterns("checkpoints"))
    base_card = ModelCard.from_pretrained(custom)
    base_card.prompts = {**base_card.prompts, "preamble": "A crystal. "}
    base_card.save_pretrained(custom)
    again = train(crystals[:8], tmp_path / "again", base=str(custom), full=True, max_steps=1, batch_size=4,
                  progress=False)  # fmt: skip
    assert again.template.preamble == "A crystal. "
    part = tmp_path / "part"
    with pytest.raises(Kill):
        train(crystals, part, callbacks=[_kill_at(3)], **kwargs)
    train(crystals, part, resume=True, **kwargs)
    assert np.allclose(losses(part), losses(out), rtol=1e-5, atol=1e-6)


def test_bad_settings():
    with pytest.raises(ValueError, match="--full.*--base"):
        train([], "/nonexistent", from_scratch="tiny", full=True)
    with pytest.raises(ValueError, match="quantised"):
        train([], "/nonexistent", base="/nonexistent", full=True, quantize="4bit")
    with pytest.raises(ValueError, match="unknown from-scratch size 'huge'"):
        train([], "/nonexistent", from_scratch="huge")
    with pytest.raises(ValueError, match="exactly one"):
        train([], "/nonexistent")
    with pytest.raises(ValueError, match="empty"):
        train([], "/tmp/never-written-crystal-llm", from_scratch="tiny")
    assert set(SIZES) >= {"tiny", "small"}


def test_modelcard_detects_missing_and_corrupt_weights(tiny_model_dir, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(tiny_model_dir, copy, ignore=shutil.ignore_patterns("checkpoints"))
    card = ModelCard.from_pretrained(copy)
    with open(copy / "model.safetensors", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ModelCardError, match="sha256"):
        card.verify_weights(copy)
    (copy / "model.safetensors").unlink()
    with pytest.raises(ModelCardError, match="missing"):
        card.verify_weights(copy)
    (copy / CARD_NAME).write_text('{"format_version": 99}')
    with pytest.raises(ModelCardError, match="version"):
        ModelCard.from_pretrained(copy)


# -- command line -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_file(tmp_path_factory, crystals):
    path = tmp_path_factory.mktemp("data") / "train.extxyz"
    ase.io.write(path, crystals[:16])
    return path


def _one_line_error(capsys, argv, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_cli_bad_input_is_one_line_exit_2(capsys, tmp_path, train_file):
    out = str(tmp_path / "out")
    _one_line_error(capsys, ["train", "--data", str(train_file), "--out", out, "--base", "meta-llama/NoSuchModel-7b"],
                    "offline", "local")  # fmt: skip
    _one_line_error(capsys, ["train", "--data", str(tmp_path / "missing.csv"), "--out", out, "--from-scratch", "tiny"],
                    "not found")  # fmt: skip
    empty = tmp_path / "empty.csv"
    empty.write_text("material_id,cif\n")
    _one_line_error(capsys, ["train", "--data", str(empty), "--out", out, "--from-scratch", "tiny"], "empty")
    _one_line_error(capsys, ["train", "--data", str(train_file), "--out", out, "--from-scratch", "giant"], "giant")
    _one_line_error(capsys, ["train", "--data", str(train_file), "--out", out, "--from-scratch", "tiny", "--full"],
                    "--full", "--base")  # fmt: skip
    _one_line_error(capsys, ["merge", str(tmp_path), "-o", out], "no model card")


def test_cli_train_resume_and_mismatch(capsys, tmp_path, train_file):
    out = str(tmp_path / "out")
    args = ["train", "--data", str(train_file), "--out", out, "--from-scratch", "tiny", "--max-steps", "2",
            "--batch-size", "4", "--no-progress", "--no-cache"]  # fmt: skip
    assert main(args) == 0
    assert "model written to" in capsys.readouterr().out
    _one_line_error(capsys, args, "--resume")
    _one_line_error(capsys, args + ["--resume", "--lr", "0.1"], "another configuration")
    assert main(args + ["--resume"]) == 0
    prompts = tmp_path / "prompts.json"
    prompts.write_text('{"max_conditions": 5}')
    reworded = str(tmp_path / "reworded")
    assert main([*args[:4], reworded, *args[5:], "--prompts", str(prompts)]) == 0
    assert ModelCard.from_pretrained(reworded).template.max_conditions == 5


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_process_data_parallel(tmp_path, train_file):
    """accelerate launch: 2 CPU processes (gloo) train data-parallel with no code change."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        # --multi_gpu selects accelerate's torchrun launcher; on a CPU-only host training uses gloo
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        "-m", "ase_crystal_llm.cli", "train", "--data", str(train_file), "--out", str(out),
        "--from-scratch", "tiny", "--max-steps", "3", "--batch-size", "4", "--no-progress", "--no-cache",
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    card = ModelCard.from_pretrained(out)
    assert card.hyperparameters["world_size"] == 2
    assert card.hyperparameters["global_batch_size"] == 8
    log = json.loads((out / LOG_NAME).read_text())
    assert len(log["steps"]) == 3 and all(np.isfinite(s["loss"]) for s in log["steps"])
    card.verify_weights(out)
    # 2 processes x 1 micro-batch == 1 process x 2 accumulated micro-batches: same batches, same loss
    single = tmp_path / "single"
    train(str(train_file), single, from_scratch="tiny", max_steps=3, batch_size=4, grad_accum=2, cache=False,
          progress=False)  # fmt: skip
    assert np.allclose(losses(out), losses(single), rtol=1e-4)


def test_compiled_layers_train_to_the_same_losses(tmp_path, tiny_base, crystals):
    # lora_dropout 0: both runs then compute the same function; compile only fuses its kernels.
    kwargs = dict(base=str(tiny_base), max_steps=3, batch_size=4, lr=5e-3, lora_dropout=0.0, progress=False)
    train(crystals[:12], tmp_path / "eager", **kwargs)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    train(crystals[:12], tmp_path / "compiled", compile=True, **kwargs)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs
    losses = [[s["loss"] for s in json.loads((tmp_path / run / "training_log.json").read_text())["steps"]]
              for run in ("eager", "compiled")]  # fmt: skip
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
