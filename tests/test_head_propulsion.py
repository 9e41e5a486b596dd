"""Propulsion (``lightning_peft.heads.Propulsion``): the spec's tests (../shared/methods/propulsion.md §12)
and the issue's parameter counts on a RoBERTa-base-sized config built without weights."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import cpu_threads
from torch import nn
from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaModel

from lightning_peft import SequenceClassifier
from lightning_peft.backbones import load_backbone
from lightning_peft.heads import HeadError, Propulsion
from lightning_peft.heads.base import Head
from lightning_peft.heads.propulsion import PropulsionScaled

cpu_threads()

TINY = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=40, type_vocab_size=1)


def tiny_roberta(cls=RobertaForSequenceClassification, **kw) -> nn.Module:
    torch.manual_seed(0)
    return cls(RobertaConfig(**TINY), **kw).double().eval()


def ids(n=3, length=9, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, 97, (n, length), generator=g)
    x[:, 0] = 0
    return x


def randomise_z(model: nn.Module, low=0.9, high=1.1, seed=1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, PropulsionScaled):
                m.propulsion_z.copy_(torch.rand(m.propulsion_z.shape, generator=g, dtype=torch.float64)
                                     * (high - low) + low)


# ---------------------------------------------------------------------------------------------- counts
def test_tiny_counts_match_the_spec_numbers():
    # L(5d + f) + 3d = 2(160 + 64) + 96 = 544 (no pooler, no classifier); Attn: 3dL = 192
    model = Propulsion(targets="all").attach(tiny_roberta(RobertaModel, add_pooling_layer=False))
    assert Head.trainable_parameters(model) == 544
    model = Propulsion(targets="attention").attach(tiny_roberta(RobertaModel, add_pooling_layer=False))
    assert Head.trainable_parameters(model) == 192


def _roberta_base_on_meta() -> nn.Module:
    with torch.device("meta"):  # RoBERTa-base sizes (L=12, d=768, f=3072, 3 embeddings, 2 labels), no weights
        return RobertaForSequenceClassification(RobertaConfig())


@pytest.mark.parametrize("targets,expected", [("all", 86_018), ("attention", 27_648)])
def test_roberta_base_counts_of_the_paper(targets, expected):
    """The paper's accounting: classifier weights frozen; with "all" their two scale vectors train."""
    head = Propulsion(targets=targets, train_classifier=False)
    model = _roberta_base_on_meta()
    assert head.expected_trainable_parameters(model) == expected
    assert Head.trainable_parameters(head.attach(model)) == expected


def test_roberta_base_count_with_the_classifier_trained():
    head = Propulsion(targets="all")  # default: the new classifier trains fully and is not scaled
    model = head.attach(_roberta_base_on_meta())
    d, f, L = 768, 3072, 12
    classifier = d * d + d + 2 * d + 2
    assert Head.trainable_parameters(model) == L * (5 * d + f) + 3 * d + classifier
    assert head.expected_trainable_parameters(_roberta_base_on_meta()) == Head.trainable_parameters(model)


def test_llama_counts_follow_the_gqa_widths():
    llama, _ = load_backbone("tiny-llama", task="causal-lm")  # d=64, f=128, 2 kv heads of 16, L=2
    model = Propulsion(targets="attention").attach(llama)
    assert Head.trainable_parameters(model) == 2 * (64 + 32 + 32)
    llama, _ = load_backbone("tiny-llama", task="causal-lm")
    model = Propulsion(targets="all").attach(llama)  # q,k,v,o,gate,up,down + embed_tokens; lm_head unwrapped
    assert Head.trainable_parameters(model) == 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64) + 64
    assert not isinstance(model.lm_head, PropulsionScaled)


def test_targets_filter_wraps_exactly_3L_modules():
    model = Propulsion(targets=["query", "key", "value"]).attach(tiny_roberta())
    wrapped = [n for n, m in model.named_modules() if isinstance(m, PropulsionScaled)]
    assert len(wrapped) == 3 * 2
    assert {n.rsplit(".", 1)[-1] for n in wrapped} == {"query", "key", "value"}


# ---------------------------------------------------------------------------------------------- behaviour
def test_identity_at_init_is_exact():
    base = tiny_roberta()
    model = Propulsion(degree=15, targets="all").attach(copy.deepcopy(base))
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, base(input_ids=x).logits)


def test_only_z_trains_by_default_and_train_bias_adds_the_biases():
    model = Propulsion(targets="all", train_classifier=False).attach(tiny_roberta())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("propulsion_z") for n in trainable)
    model = Propulsion(targets=["query"], train_bias=True, train_classifier=False).attach(tiny_roberta())
    trainable = sorted(n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["bias", "bias", "propulsion_z", "propulsion_z"]
    assert Head.trainable_parameters(model) == 2 * (32 + 32)


def test_a_wrapped_linear_computes_the_scaled_output():
    torch.manual_seed(0)
    linear = nn.Linear(5, 4).double()
    wrapped = PropulsionScaled(linear, degree=3)
    z = torch.tensor([0.9, 1.05, 1.1, 0.95], dtype=torch.float64)
    with torch.no_grad():
        wrapped.propulsion_z.copy_(z)
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    want = (x @ linear.weight.T + linear.bias) * torch.tensor([0.729, 1.157625, 1.331, 0.857375], dtype=torch.float64)
    torch.testing.assert_close(wrapped(x), want, rtol=0, atol=1e-12)


def test_gradient_on_z_at_init_is_degree_times_the_degree_1_gradient():
    x = ids()
    grads = {}
    for k in (1, 7):
        model = Propulsion(degree=k, targets="all", train_classifier=False).attach(tiny_roberta())
        model(input_ids=x).logits.pow(2).sum().backward()
        grads[k] = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if p.requires_grad])
    assert grads[1].abs().max() > 0
    torch.testing.assert_close(grads[7], 7 * grads[1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_merge_equals_unmerged_and_leaves_plain_layers(dtype, atol):
    head = Propulsion(degree=3, targets="all", train_bias=True)
    model = head.attach(tiny_roberta()).to(dtype)
    randomise_z(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = ids()
    for _ in range(3):
        model(input_ids=x).logits.pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        expected = model(input_ids=x).logits
        merged = head.merge(copy.deepcopy(model))
        got = merged(input_ids=x).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)
    assert not any(isinstance(m, PropulsionScaled) for m in merged.modules())
    assert all(type(merged.get_submodule(n)) is nn.Linear for n in ("roberta.encoder.layer.0.attention.self.query",
                                                                     "roberta.encoder.layer.1.output.dense"))
    assert type(merged.roberta.embeddings.word_embeddings) is nn.Embedding
    assert not any("propulsion" in n for n, _ in merged.named_parameters())


def test_merge_with_tied_embeddings_unties_them_and_the_merged_folder_reloads(tmp_path):
    """GPT-2 ties ``wte`` and ``lm_head``: the unmerged model scales only the lookup, so a merge that scaled
    the shared table would change the LM head too. The merge unties; saved and reloaded, it still matches."""
    from transformers import AutoModelForCausalLM

    gpt2, _ = load_backbone("tiny-gpt2", task="causal-lm")
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    head = Propulsion(degree=5, targets="all")
    model = head.attach(gpt2).double().eval()
    assert isinstance(model.transformer.wte, PropulsionScaled) and not isinstance(model.lm_head, PropulsionScaled)
    randomise_z(model)
    x = ids(length=12)
    with torch.no_grad():
        expected = model(input_ids=x).logits
        merged = head.merge(copy.deepcopy(model))
        assert merged.lm_head.weight is not merged.transformer.wte.weight
        assert merged.config.tie_word_embeddings is False
        torch.testing.assert_close(merged(input_ids=x).logits, expected, rtol=0, atol=1e-10)
        merged.save_pretrained(tmp_path)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
        torch.testing.assert_close(reloaded(input_ids=x).logits, expected, rtol=0, atol=1e-10)


def test_disabled_runs_the_frozen_layers_alone_and_changes_no_flag():
    base = tiny_roberta()
    head = Propulsion(degree=3, targets="all", train_classifier=False)
    model = head.attach(copy.deepcopy(base))
    randomise_z(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    x = ids()
    with torch.no_grad():
        scaled = model(input_ids=x).logits
        with head.disabled(model):
            inside = model(input_ids=x).logits
        after = model(input_ids=x).logits
        want = base(input_ids=x).logits
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert torch.equal(inside, want)
    assert torch.equal(after, scaled) and not torch.allclose(scaled, want)


@pytest.mark.parametrize("decay_z", [False, True])
def test_weight_decay_skips_z_unless_asked(decay_z):
    """AdamW with a zero gradient moves a parameter only through weight decay."""
    module = SequenceClassifier(backbone="tiny-bert", head=Propulsion(targets="all", decay_z=decay_z))
    module.set_optimizer("torch.optim.AdamW", lr=0.1, weight_decay=0.5)
    opt = module.configure_optimizers()
    zs = [p for n, p in module.model.named_parameters() if n.endswith("propulsion_z")]
    others = [p for n, p in module.model.named_parameters() if p.requires_grad and not n.endswith("propulsion_z")]
    assert zs and others
    before = [p.detach().clone() for p in others]
    for p in zs + others:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p in zs:
        assert torch.equal(p, torch.full_like(p, 0.95)) if decay_z else torch.equal(p, torch.ones_like(p))
    assert all(torch.allclose(p, 0.95 * b) for p, b in zip(others, before))


def test_z_penalty_is_the_squared_distance_from_one():
    head = Propulsion(targets=["query"], train_classifier=False, z_penalty=0.5)
    model = head.attach(tiny_roberta())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, PropulsionScaled):
                m.propulsion_z.fill_(1.5)  # 2 layers x 32 entries x 0.25
    assert head.regularization_loss(model).item() == pytest.approx(0.5 * 64 * 0.25)
    assert Propulsion().regularization_loss(model) is None


@pytest.mark.parametrize("kwargs,match", [
    ({"degree": 0}, "degree=0 must be a positive integer"),
    ({"degree": 2.5}, "degree=2.5 must be a positive integer"),
    ({"targets": "mlp"}, "targets='mlp' is not one of"),
    ({"targets": []}, r"targets=\[\] names no module"),
    ({"z_penalty": -1.0}, "z_penalty=-1.0 is negative"),
])
def test_bad_configuration_is_one_sentence(kwargs, match):
    with pytest.raises(HeadError, match=match):
        Propulsion(**kwargs)


def test_targets_matching_nothing_name_the_linear_modules():
    with pytest.raises(HeadError, match=r"match no Linear or Embedding.*'query'"):
        Propulsion(targets=["LayerNorm"]).attach(tiny_roberta())


def test_cli_fit_then_both_exports(tmp_path):
    """A Trainer run with the head from the command line; the merged export reloads as a plain model with the
    same logits (export checks them), the unmerged one writes the head alone and it reloads exactly."""
    from helpers import REPO, causal_batch

    from lightning_peft.checkpoints import load_module
    from lightning_peft.cli import main
    from lightning_peft.export import export

    root = tmp_path / "run"
    main(["fit", "--config", str(REPO / "examples" / "quickstart.yaml"), "--trainer.max_steps", "3",
          "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
          "--trainer.limit_val_batches", "0", "--data.init_args.num_train", "128",
          "--model.head", "lightning_peft.heads.Propulsion", "--model.head.init_args.degree", "5"])
    last = str(next(root.rglob("last.ckpt")))
    trained = load_module(last)
    zs = [p for n, p in trained.model.named_parameters() if n.endswith("propulsion_z")]
    assert zs and any(not torch.equal(z, torch.ones_like(z)) for z in zs)  # the checkpoint holds trained scales
    assert export(last, str(tmp_path / "merged"), merge=True)["max_abs_logit_diff"] <= 1e-5
    export(last, str(tmp_path / "head"), merge=False)
    fresh = load_module(last)
    with torch.no_grad():
        for z in fresh.model.parameters():
            if z.requires_grad:
                z.fill_(1.0)
    fresh.head.load(fresh.model, str(tmp_path / "head"))
    batch = causal_batch(n=2)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        assert torch.equal(fresh(inputs).logits, trained(inputs).logits)
