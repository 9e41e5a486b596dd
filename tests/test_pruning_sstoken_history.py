"""SSToken's history pass (issue 12, defect 3): the fast online route and the offline history cache
(``lightning-peft sstoken-history``), its keys and its refusals."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys

import lightning as L
import pytest
import torch
from helpers import REPO, cpu_threads, cpu_trainer
from pruning_helpers import padded_batch
from pruning_helpers import randomised as _randomised

from lightning_peft import CausalLM
from lightning_peft.datamodules import SFTDataModule
from lightning_peft.datamodules.pruning import SSToken
from lightning_peft.datamodules.pruning import history_cache as hc
from lightning_peft.heads import LoRA

cpu_threads()


def _hand_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Label-aligned CE by hand (float64 log-softmax, gather): index t = loss of token t, 0 on -100 / column 0."""
    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    tgt = labels[:, 1:]
    ce = -lp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0] * (tgt != -100)
    return torch.cat([torch.zeros_like(ce[:, :1]), ce], 1).float()


# ------------------------------------------------------------------------------ the fast online pass
def test_adapter_history_fast_path_equals_full_logits_of_the_base():
    """history='adapter' (the default with LoRA) equals the base model's full-logits losses to 1e-5 in fp32,
    with a moved adapter and LoRA dropout 0.1 in train mode, and applies the LM head to the response
    positions only (the full-vocabulary logits of the prompt are never built)."""
    torch.manual_seed(0)
    module = CausalLM(backbone="tiny-llama", head=LoRA(r=4, alpha=8, dropout=0.1))
    _randomised(module, seed=3)
    module.train()
    batch = padded_batch(module.tokenizer, seed=2)
    base = copy.deepcopy(module.model).unload().eval()
    with torch.no_grad():
        want = _hand_losses(base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                            batch["labels"])
    rows = []
    handle = module.model.get_base_model().lm_head.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    pruner = SSToken()
    try:
        got = pruner.history_losses(module, batch)
        again = pruner.history_losses(module, batch)
    finally:
        handle.remove()
    assert pruner._mode(module) == "adapter" and module.training
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert torch.equal(got, again)  # no dropout draw in the history pass
    assert rows == [int((batch["labels"][:, 1:] != -100).sum())] * 2  # LM head at response positions only
    current = module.eval()(batch).logits
    module.train()
    assert (_hand_losses(current, batch["labels"]) - want).abs().max() > 1e-3  # the adapter matters here


@pytest.mark.parametrize("model_type", ["gemma", "gpt2", "gpt_neox", "mistral", "opt", "phi3", "qwen2", "qwen3"])
def test_fast_history_equals_full_logits_on_every_claimed_family(model_type):
    """The fast history pass on each other family SSToken claims: the base model's full-logits losses to 1e-5,
    with the LM head applied to the response positions only."""
    from test_family_matrix import _module

    from lightning_peft.architectures import lm_head

    module = _randomised(_module(model_type), seed=5).train()
    batch = padded_batch(None, seed=3)
    base = copy.deepcopy(module.model).unload().eval()
    with torch.no_grad():
        want = _hand_losses(base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                            batch["labels"])
    rows = []
    handle = lm_head(module.model).register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    try:
        got = SSToken().history_losses(module, batch)
    finally:
        handle.remove()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert rows == [int((batch["labels"][:, 1:] != -100).sum())]


# ------------------------------------------------------------------------------ the offline cache
ROWS = [{"instruction": f"add {a} and {b}", "output": str(a + b)} for a, b in
        [(1, 2), (13, 4), (20, 22), (7, 7), (100, 5), (9, 0), (31, 31), (2, 50), (64, 1), (8, 80), (5, 5), (40, 2)]]


def _config(tmp_path, pruner_args: dict | None = None) -> str:
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(ROWS))
    pruner = {"class_path": "lightning_peft.datamodules.pruning.SSToken",
              "init_args": {"gamma": 1.0, "rho": 0.5, "rel_warmup_fraction": 0.0, **(pruner_args or {})}}
    cfg = {
        "seed_everything": 0,
        "trainer": {"max_steps": 1, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
                    "num_sanity_val_steps": 0, "default_root_dir": str(tmp_path / "run")},
        "model": {"class_path": "lightning_peft.CausalLM",
                  "init_args": {"backbone": "tiny-llama", "head": {"class_path": "lightning_peft.heads.LoRA",
                                                                   "init_args": {"r": 4, "alpha": 8}}}},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
        "data": {"class_path": "lightning_peft.datamodules.SFTDataModule",
                 "init_args": {"train_file": str(data), "prompt_template": "Q: {instruction}\nA: ",
                               "response_field": "output", "max_length": 64, "batch_size": 4, "pruner": pruner}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return str(path)


def _datamodule(config: str, pruner) -> SFTDataModule:
    init = json.loads(open(config).read())["data"]["init_args"]
    return SFTDataModule(**{**init, "pruner": pruner})


def test_command_builds_the_cache_next_to_the_data_and_training_with_it_matches_online(tmp_path, capsys):
    config = _config(tmp_path)
    path = hc.main(["--config", config, "--no-progress"])
    assert path == str(tmp_path / "rows.json") + hc.SUFFIX and os.path.exists(path)
    assert "history_cache:" in capsys.readouterr().out  # says how to train with it
    stamp = os.stat(path).st_mtime_ns
    assert hc.main(["--config", config, "--no-progress"]) == path  # up to date: kept as it is
    assert "up to date" in capsys.readouterr().out and os.stat(path).st_mtime_ns == stamp

    # the cached losses are the base model's, sample by sample: equal to the online pass of a moved adapter
    torch.manual_seed(1)
    module = _randomised(CausalLM(backbone="tiny-llama", head=LoRA(r=4, alpha=8)), seed=4)
    dm = _datamodule(config, None)
    dm.set_tokenizer(module.tokenizer)
    dm.setup("fit")
    cached, online = SSToken(history_cache=path), SSToken(history="adapter")
    loader = torch.utils.data.DataLoader(dm._split("train"), batch_size=5, collate_fn=dm.collator())
    for batch in loader:  # other batches than the build's: the lookup is per sample
        torch.testing.assert_close(cached.history_losses(module, batch), online.history_losses(module, batch),
                                   rtol=0, atol=1e-6)

    # training with the cache takes the same steps as training with the online history
    def fit(pruner) -> tuple[list[float], dict[str, torch.Tensor]]:
        L.seed_everything(0)
        module = CausalLM(backbone="tiny-llama", head=LoRA(r=4, alpha=8))
        module.set_optimizer("torch.optim.AdamW", lr=0.05)
        rel = []

        class Rel(L.Callback):
            def on_train_batch_end(self, trainer, *args):
                rel.append(float(trainer.callback_metrics["pruning/rel_mean"]))

        trainer = cpu_trainer(tmp_path / "fit", max_steps=4, callbacks=[Rel()])
        trainer.fit(module, datamodule=_datamodule(config, pruner))
        return rel, {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    rel_cache, state_cache = fit(SSToken(gamma=1.0, rho=0.5, rel_warmup_fraction=0.0, history_cache=path))
    rel_online, state_online = fit(SSToken(gamma=1.0, rho=0.5, rel_warmup_fraction=0.0, history="adapter"))
    assert rel_cache == pytest.approx(rel_online, abs=1e-5) and abs(rel_cache[-1]) > 1e-4
    for name, value in state_online.items():
        torch.testing.assert_close(state_cache[name], value, rtol=0, atol=1e-5)


def test_stale_or_foreign_caches_are_refused_in_one_sentence(tmp_path):
    config = _config(tmp_path)
    path = hc.main(["--config", config, "--no-progress", "--out", str(tmp_path / "history.pt")])
    rebuild = re.escape(f"`lightning-peft sstoken-history --config {config}`")
    batch = padded_batch(None, seed=0)

    other_model = CausalLM(backbone="tiny-llama", backbone_config={"num_hidden_layers": 1}, head=LoRA(r=4, alpha=8))
    with pytest.raises(hc.HistoryCacheError, match=rf"^SSToken's history cache '{re.escape(path)}' was built for "
                                                    rf"base model .*; rebuild it with {rebuild}\.$"):
        SSToken(history_cache=path).history_losses(other_model, batch)

    module = CausalLM(backbone="tiny-llama", head=LoRA(r=4, alpha=8))
    with pytest.raises(hc.HistoryCacheError, match=rf"'{re.escape(path)}' has no entry for a training sample .*"
                                                    rf"rebuild it with {rebuild}\.$"):
        SSToken(history_cache=path).history_losses(module, batch)  # other data

    missing = str(tmp_path / "nowhere.pt")
    with pytest.raises(hc.HistoryCacheError, match=r"does not exist; build it with `lightning-peft sstoken-history"):
        SSToken(history_cache=missing).history_losses(module, batch)

    precious = tmp_path / "notes.pt"
    precious.write_text("my notes")
    with pytest.raises(hc.HistoryCacheError, match="is not an SSToken history cache; it is left untouched"):
        hc.main(["--config", config, "--no-progress", "--out", str(precious), "--force"])
    assert precious.read_text() == "my notes"
    with pytest.raises(hc.HistoryCacheError, match="is not an SSToken history cache"):
        SSToken(history_cache=str(precious)).history_losses(module, batch)


def test_lightning_peft_sstoken_history_command(tmp_path):
    """The documented shell command, in a subprocess; then `fit` with the cache, in-process."""
    config = _config(tmp_path)
    out = tmp_path / "cache.pt"
    env = {k: v for k, v in os.environ.items()
           if k not in ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "lightning_peft.cli", "sstoken-history", "--config", config,
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"to {out}." in proc.stdout and "SSToken history losses" in proc.stderr  # the tqdm bar
    assert torch.load(out, weights_only=True)["samples"] == len(ROWS)
    proc = subprocess.run([sys.executable, "-m", "lightning_peft.cli", "sstoken-history", "--config", config,
                           "--model.init_args.backbone_config", '{"num_hidden_layers": 1}', "--out",
                           str(tmp_path / "rows.json")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: ")  # no traceback
    assert "is not an SSToken history cache; it is left untouched" in proc.stderr

    from lightning_peft.cli import main

    with pytest.raises(hc.HistoryCacheError, match="does not exist"):  # the override reaches the pruner
        main(["fit", "--config", config, "--data.pruner.init_args.history_cache", str(tmp_path / "none.pt")])
    main(["fit", "--config", config, "--data.pruner.init_args.history_cache", str(out)])
