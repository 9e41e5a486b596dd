"""DataModules: prompt masking, padding, file formats, errors, determinism and mid-epoch resume."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lightning_peft.backbones import build_byte_tokenizer
from lightning_peft.datamodules import (
    ClassificationDataModule,
    DataError,
    SFTDataModule,
    SyntheticSFTDataModule,
)
from lightning_peft.datamodules.common import ResumableSampler
from lightning_peft.datamodules.pruning import BatchPruner

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent")

ROWS = [
    {"question": "What is 2+2?", "answer": "4", "label": "pos"},
    {"question": "Name a colour.", "answer": "Blue, like the sky.", "label": "neg"},
    {"question": "Say hello in French, please.", "answer": "Bonjour", "label": "pos"},
    {"question": "Spell 'cat' backwards.", "answer": "tac", "label": "neg"},
]
TEMPLATE = "Q: {question}\nA: "


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sft(path: str, tok, **kw) -> SFTDataModule:
    kw.setdefault("prompt_template", TEMPLATE)
    kw.setdefault("response_field", "answer")
    dm = SFTDataModule(path, **kw)
    dm.set_tokenizer(tok)
    return dm


# ------------------------------------------------------------------------------ masking and padding
def test_prompt_tokens_masked_exactly(tmp_path, tok):
    dm = sft(write_jsonl(tmp_path / "d.jsonl", ROWS), tok, batch_size=4)
    dm.setup("fit")
    batch = dm.collator()(dm._data["train"])
    for i, row in enumerate(ROWS):
        ids, labels, mask = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
        prompt = tok(TEMPLATE.format(**row))["input_ids"]
        response = tok(row["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = len(prompt) + len(response)
        assert ids[:n].tolist() == prompt + response
        assert ids[0].item() == tok.bos_token_id
        assert (labels[: len(prompt)] == -100).all()
        assert labels[len(prompt):n].tolist() == response  # aligned with input_ids, not shifted
        assert (labels[n:] == -100).all() and (ids[n:] == tok.pad_token_id).all()
        assert mask[:n].all() and not mask[n:].any()
        trained = labels[labels != -100].tolist()
        assert trained[-1] == tok.eos_token_id
        assert tok.decode(trained[:-1]) == row["answer"]


def test_dynamic_padding_to_longest_in_batch(tmp_path, tok):
    rows = [{"question": "q" * k, "answer": "a" * (k % 3 + 1)} for k in range(1, 11)]
    dm = sft(write_jsonl(tmp_path / "d.jsonl", rows), tok, val_file=write_jsonl(tmp_path / "v.jsonl", rows),
             batch_size=3, eval_batch_size=4)
    dm.setup("fit")
    lengths = [len(e["input_ids"]) for e in dm._data["val"]]
    widths = [b["input_ids"].shape[1] for b in dm.val_dataloader()]
    assert widths == [max(lengths[i:i + 4]) for i in range(0, len(lengths), 4)]
    assert len(set(widths)) > 1
    for batch in dm.train_dataloader():
        assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max())
        assert batch["input_ids"].dtype == torch.long and batch["labels"].shape == batch["input_ids"].shape


def test_chat_template_prompt_not_doubled(tmp_path, tok):
    dm = sft(write_jsonl(tmp_path / "d.jsonl", ROWS[:1]), tok, prompt_template=None, prompt_field="question",
             use_chat_template=True, system_prompt="Be brief.")
    dm.setup("fit")
    ex = dm._data["train"][0]
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": ROWS[0]["question"]}],
                                   add_generation_prompt=True, tokenize=False)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    assert ex["input_ids"][: len(prompt)] == prompt
    assert ex["input_ids"][1] != tok.bos_token_id  # no second BOS in front of the template's own <s>
    assert tok.decode([t for t in ex["labels"] if t != -100], skip_special_tokens=True) == ROWS[0]["answer"]


def test_long_samples_cut_prompt_from_left_first(tmp_path, tok):
    rows = [{"question": "x" * 30 + "END", "answer": "yes"}, {"question": "q", "answer": "r" * 40}]
    dm = sft(write_jsonl(tmp_path / "d.jsonl", rows), tok, prompt_template="{question}", max_length=10)
    with pytest.warns(UserWarning, match="1 of 2 train samples are so long"):
        dm.setup("fit")
    first, second = dm._data["train"]
    assert len(first["input_ids"]) == 10 and first["input_ids"][0] == tok.bos_token_id
    assert tok.decode(first["input_ids"][1:6]) == "xxEND"  # the prompt's start was cut, BOS kept
    assert first["labels"][6:] == tok("yes", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert second["input_ids"][0] == tok.bos_token_id and second["labels"][0] == -100
    assert tok.decode(second["labels"][1:]) == "r" * 9  # response alone too long: its start, no prompt


# ------------------------------------------------------------------------------ file formats
def test_csv_jsonl_json_parquet_and_save_to_disk_load_the_same(tmp_path, tok):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    paths = {
        "jsonl": write_jsonl(tmp_path / "d.jsonl", ROWS),
        "json": str(tmp_path / "d.json"),
        "csv": str(tmp_path / "d.csv"),
        "parquet": str(tmp_path / "d.parquet"),
        "disk": str(tmp_path / "disk"),
        "dict": str(tmp_path / "dict"),
    }
    Path(paths["json"]).write_text(json.dumps(ROWS))
    ds.to_csv(paths["csv"])
    ds.to_parquet(paths["parquet"])
    ds.save_to_disk(paths["disk"])
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(paths["dict"])
    loaded = {}
    for kind, path in paths.items():
        dm = sft(path, tok)
        dm.setup("fit")
        loaded[kind] = dm._data["train"]
    assert len(loaded["jsonl"]) == len(ROWS)
    for kind, examples in loaded.items():
        assert examples == loaded["jsonl"], kind


def test_val_fraction_split_is_seeded(tmp_path, tok):
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(50)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    splits = []
    for seed in (0, 0, 1):
        dm = sft(path, tok, val_fraction=0.1, seed=seed)
        dm.setup("fit")
        splits.append([tok.decode(e["input_ids"], skip_special_tokens=True) for e in dm._data["val"]])
        assert len(dm._data["val"]) == 5 and len(dm._data["train"]) == 45
    assert splits[0] == splits[1] and splits[0] != splits[2]


# ------------------------------------------------------------------------------ errors
def test_missing_file_names_the_path(tmp_path, tok):
    missing = str(tmp_path / "nope.jsonl")
    dm = sft(missing, tok)
    with pytest.raises(DataError, match="nope.jsonl"):
        dm.setup("fit")


def test_missing_field_lists_the_columns(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(DataError, match=r"'output'.*\['question', 'answer', 'label'\]"):
        sft(path, tok, response_field="output").setup("fit")
    with pytest.raises(DataError, match=r"'instruction'.*\['question', 'answer', 'label'\]"):
        sft(path, tok, prompt_template="{instruction}\n").setup("fit")
    with pytest.raises(DataError, match=r"'sentence'.*\['question', 'answer', 'label'\]"):
        c = ClassificationDataModule(path, text_field="sentence")
        c.set_tokenizer(tok)
        c.setup("fit")


def test_all_samples_truncated_raises(tmp_path, tok):
    dm = sft(write_jsonl(tmp_path / "d.jsonl", ROWS), tok, max_length=1)  # only the BOS fits
    with pytest.raises(DataError, match=r"All 4 train samples have no response tokens.*max_length=1"):
        dm.setup("fit")


def test_some_samples_without_response_are_dropped_with_a_warning(tmp_path, tok):
    rows = ROWS + [{"question": "Empty?", "answer": ""}, {"question": "None?", "answer": None}]
    dm = sft(write_jsonl(tmp_path / "d.jsonl", rows), tok)
    with pytest.warns(UserWarning, match=r"Dropped 2 of 6 train samples that have no response tokens"):
        dm.setup("fit")
    assert len(dm._data["train"]) == 4
    assert all(any(t != -100 for t in e["labels"]) for e in dm._data["train"])


def test_label_outside_label_set_raises(tmp_path, tok):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    val = write_jsonl(tmp_path / "v.jsonl", [{"text": "meh", "label": "neutral"}])
    dm = ClassificationDataModule(train, val_file=val, label_names=["neg", "pos"])
    dm.set_tokenizer(tok)
    with pytest.raises(DataError, match=r"'neutral'.*\['neg', 'pos'\]"):
        dm.setup("fit")
    ints = write_jsonl(tmp_path / "i.jsonl", [{"text": "x", "label": 0}, {"text": "y", "label": 2}])
    dm = ClassificationDataModule(ints, label_names=["neg", "pos"])
    dm.set_tokenizer(tok)
    with pytest.raises(DataError, match=r"Label 2 .*\['neg', 'pos'\]"):
        dm.setup("fit")
    dm = ClassificationDataModule(train, val_file=val)  # inferred from train: neg, pos
    dm.set_tokenizer(tok)
    with pytest.raises(DataError, match=r"'neutral'.*\['neg', 'pos'\]"):
        dm.setup("fit")


def test_max_length_above_model_positions_raises(tmp_path, tok):
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=64))
    dm = sft(write_jsonl(tmp_path / "d.jsonl", ROWS), tok, max_length=128)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(model=model, tokenizer=tok))
    with pytest.raises(DataError, match=r"max_length=128.*64"):
        dm.setup("fit")
    dm = sft(write_jsonl(tmp_path / "d.jsonl", ROWS), tok, max_length=64)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(model=model, tokenizer=tok))
    dm.setup("fit")


def test_tokenizer_comes_from_the_model_when_none(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    dm = SFTDataModule(path, prompt_template=TEMPLATE, response_field="answer")
    with pytest.raises(DataError, match="set_tokenizer"):
        dm.setup("fit")
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=tok))
    dm.setup("fit")
    assert dm.tokenizer is tok
    spec = SFTDataModule(path, prompt_template=TEMPLATE, response_field="answer", tokenizer="tiny-llama")
    spec.setup("fit")
    assert spec._data["train"] == dm._data["train"]


def test_hparams_are_plain_values(tmp_path):
    dm = SFTDataModule("x.jsonl", prompt_template=TEMPLATE, pruner=BatchPruner())
    assert "pruner" not in dm.hparams
    plain = (str, int, float, bool, type(None), list, dict)
    assert all(isinstance(v, plain) for v in dict(dm.hparams).values())
    torch.save(dict(dm.hparams), tmp_path / "h.pt")
    torch.load(tmp_path / "h.pt", weights_only=True)


# ------------------------------------------------------------------------------ classification
def test_classification_labels_and_pairs(tmp_path, tok):
    rows = [{"a": "the cat", "b": "a dog", "label": "no"}, {"a": "x", "b": "x", "label": "yes"},
            {"a": "long " * 20, "b": "short", "label": "no"}]
    dm = ClassificationDataModule(write_jsonl(tmp_path / "d.jsonl", rows), text_field=["a", "b"], max_length=16)
    assert dm.num_labels == 2 and dm.class_names == ["no", "yes"]  # before setup: read from the train file
    dm.set_tokenizer(tok)
    dm.setup("fit")
    batch = dm.collator()(dm._data["train"])
    assert batch["labels"].tolist() == [0, 1, 0] and batch["labels"].dtype == torch.long
    assert batch["input_ids"][0, : batch["attention_mask"][0].sum()].tolist() == tok("the cat", "a dog")["input_ids"]
    assert batch["input_ids"].shape[1] == 16 and set(batch) == {"input_ids", "attention_mask", "labels"}


def test_classification_int_labels_with_names(tmp_path, tok):
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": 0}, {"text": "c", "label": 2}]
    dm = ClassificationDataModule(write_jsonl(tmp_path / "d.jsonl", rows), label_names=["x", "y", "z"])
    dm.set_tokenizer(tok)
    dm.setup("fit")
    assert [e["label"] for e in dm._data["train"]] == [1, 0, 2] and dm.num_labels == 3


# ------------------------------------------------------------------------------ synthetic task
def test_synthetic_is_deterministic_and_val_disjoint(tok):
    def build(seed: int, **kw):
        dm = SyntheticSFTDataModule(num_train=300, num_val=50, seed=seed, **kw)
        dm.set_tokenizer(tok)
        dm.setup("fit")
        return dm

    a, b, c = build(0), build(0), build(1)
    assert a._data == b._data and a._data["train"] != c._data["train"]
    problems = a.problems()
    train = {p for p, _ in problems["train"]}
    assert len(train) == 300 and not train & {p for p, _ in problems["val"]}
    assert not train & {p for p, _ in problems["test"]}
    for prompt, answer in problems["train"][:20]:
        x, y = prompt[:-1].split("+")
        assert answer == str(int(x) + int(y))
    first = a._data["train"][0]
    assert tok.decode([t for t in first["labels"] if t != -100], skip_special_tokens=True) == problems["train"][0][1]
    rev = build(0, reverse_answer=True).problems()
    assert [r for _, r in rev["train"]] == [r[::-1] for _, r in problems["train"]]
    copy = SyntheticSFTDataModule(task="copy", num_digits=4, num_train=20, num_val=5).problems()
    assert all(p == r + "=" for p, r in copy["train"])
    with pytest.raises(DataError, match="num_digits=1"):
        SyntheticSFTDataModule(num_digits=1).problems()


# ------------------------------------------------------------------------------ sampler and resume
def test_sampler_epochs_are_seeded_permutations():
    data = list(range(23))
    s = ResumableSampler(data, seed=5)
    s.set_epoch(3)
    assert list(s) == torch.randperm(23, generator=torch.Generator().manual_seed(8)).tolist()
    again = ResumableSampler(data, seed=5)
    again.set_epoch(3)
    assert list(again) == list(s)
    again.set_epoch(4)
    assert list(again) != list(s)


@pytest.mark.parametrize("world", [1, 2])
def test_sampler_resume_yields_the_tail_of_the_epoch(world):
    data, bs, k, epoch = list(range(37)), 4, 3, 2
    for rank in range(world):
        full = ResumableSampler(data, seed=0, num_replicas=world, rank=rank)
        full.set_epoch(epoch)
        uninterrupted = list(full)
        resumed = ResumableSampler(data, seed=0, num_replicas=world, rank=rank)
        resumed.resume(epoch, k * bs * world)
        resumed.set_epoch(epoch - 1)
        assert len(list(resumed)) == len(uninterrupted)  # another epoch: whole
        resumed.set_epoch(epoch)
        assert list(resumed) == uninterrupted[k * bs:]
        assert list(resumed) == uninterrupted  # only the first pass of that epoch is shortened
        assert len(resumed) == len(full)


def test_datamodule_state_resumes_mid_epoch(tok):
    def build():
        dm = SyntheticSFTDataModule(num_train=40, num_val=0, batch_size=4, seed=3)
        dm.set_tokenizer(tok)
        dm.setup("fit")
        return dm

    assert build().state_dict() == {}
    full = build()
    loader = full.train_dataloader()
    loader.sampler.set_epoch(1)
    uninterrupted = [b["input_ids"].tolist() for b in loader]
    resumed = build()
    resumed.load_state_dict({"epoch": 1, "batches_done": 4, "world_size": 1})
    loader = resumed.train_dataloader()
    loader.sampler.set_epoch(1)
    assert [b["input_ids"].tolist() for b in loader] == uninterrupted[4:]
    assert len(loader) == len(uninterrupted)
    assert [b["input_ids"].tolist() for b in loader] == uninterrupted


class _Recorder(BatchPruner):
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, batch, model=None):
        self.calls += 1
        batch = dict(batch)
        batch["token_weights"] = torch.ones_like(batch["labels"], dtype=torch.float)
        return batch


def test_pruner_runs_on_training_batches_only(tok):
    pruner = _Recorder()
    dm = SyntheticSFTDataModule(num_train=8, num_val=4, batch_size=4, pruner=pruner)
    dm.set_tokenizer(tok)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    dm.trainer = SimpleNamespace(training=False, lightning_module="model")
    assert "token_weights" not in dm.on_after_batch_transfer(batch, 0) and pruner.calls == 0
    dm.trainer = SimpleNamespace(training=True, lightning_module="model")
    out = dm.on_after_batch_transfer(batch, 0)
    assert pruner.calls == 1 and out["token_weights"].shape == batch["labels"].shape


@pytest.fixture
def one_thread():
    # a tiny model on a busy 2-core machine runs far faster on one thread (no spin-waiting)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _fit(tmp_path, max_steps: int, ckpt_path: str | None = None, save_every: int | None = None, **trainer_kw):
    """Train tiny-llama + LoRA on 40 synthetic samples (5 batches of 8 an epoch); return the trained tensors."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_peft import CausalLM

    num_workers = trainer_kw.pop("num_workers", 0)
    L.seed_everything(0, verbose=False)
    model = CausalLM("tiny-llama")
    dm = SyntheticSFTDataModule(num_train=40, num_val=0, batch_size=8, seed=1, num_workers=num_workers)
    callbacks = [ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=save_every, save_top_k=-1)] if save_every else []
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=bool(save_every), callbacks=callbacks,
                        **trainer_kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, dm, ckpt_path=ckpt_path)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_resume_is_exact(tmp_path, stop: int, expected_state: dict, **trainer_kw):
    total = 12  # 5 batches an epoch: the run ends in epoch 2
    uninterrupted = _fit(tmp_path / "full", total, **trainer_kw)
    _fit(tmp_path / "part", stop, save_every=stop, **trainer_kw)
    (ckpt,) = list((tmp_path / "part").glob("*.ckpt"))
    assert torch.load(ckpt, weights_only=True)["SyntheticSFTDataModule"] == expected_state
    resumed = _fit(tmp_path / "res", total, ckpt_path=str(ckpt), **trainer_kw)
    assert any("lora_B" in n and v.abs().max() > 0 for n, v in resumed.items())  # trained weights came back
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(("stop", "num_workers", "state"), [
    (3, 0, {"epoch": 0, "batches_done": 3, "world_size": 1}),
    # with workers the first indices are drawn before Lightning calls set_epoch: the sampler must start there
    (7, 2, {"epoch": 1, "batches_done": 2, "world_size": 1}),
])
def test_trainer_resume_mid_epoch_matches_uninterrupted_run(tmp_path, one_thread, stop, num_workers, state):
    _assert_resume_is_exact(tmp_path, stop, state, num_workers=num_workers)


@pytest.mark.ddp
def test_trainer_resume_mid_epoch_on_two_ddp_processes(tmp_path, one_thread):
    # 40 samples, 2 ranks x 8: 3 batches an epoch (the last one short); stop in the middle of epoch 1
    _assert_resume_is_exact(tmp_path, 4, {"epoch": 1, "batches_done": 1, "world_size": 2},
                            strategy="ddp_fork", devices=2)


# ------------------------------------------------------------------------------ real data (offline copies)
@needs_shared
def test_gsm8k_yaml_values(tok):
    dm = SFTDataModule(str(SHARED_DATA / "gsm8k" / "train.jsonl"), prompt_template="Question: {question}\nAnswer: ",
                       response_field="answer", max_length=256, batch_size=8, val_fraction=0.02)
    dm.set_tokenizer(tok)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the byte tokenizer makes many GSM8K samples longer than 256
        dm.setup("fit")
    n_train, n_val = len(dm._data["train"]), len(dm._data["val"])
    assert n_train + n_val == 7473 and abs(n_val / 7473 - 0.02) < 0.001
    for examples in dm._data.values():
        assert all(len(e["input_ids"]) <= 256 and any(t != -100 for t in e["labels"]) for e in examples)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8


@needs_shared
def test_sst2_loads_with_two_labels(tok):
    folder = SHARED_DATA / "sst2"
    dm = ClassificationDataModule(str(folder / "stsa.binary.train"), val_file=str(folder / "stsa.binary.dev"),
                                  test_file=str(folder / "stsa.binary.test"), label_names=["negative", "positive"])
    dm.set_tokenizer(tok)
    dm.setup()
    assert dm.num_labels == 2
    assert [len(dm._data[s]) for s in ("train", "val", "test")] == [6920, 872, 1821]
    assert sum(e["label"] for e in dm._data["train"]) == 3610
    inferred = ClassificationDataModule(str(folder / "stsa.binary.dev"))
    assert inferred.num_labels == 2
