"""SparseAdapter: kept fraction, SNIP / GraSP / SynFlow scores against independent computations, masks
that keep pruned weights exactly zero through 50 AdamW steps (weight decay on), a checkpoint and a resume,
the calibration hook through a real Trainer.fit, Large-Sparse and parameter counts."""

from __future__ import annotations

import copy
import glob

import lightning as L
import pytest
import torch
from helpers import causal_batch, class_batch, cpu_threads, cpu_trainer, logits, train_steps

from lightning_peft import CausalLM, SequenceClassifier
from lightning_peft.backbones import load_backbone
from lightning_peft.datamodules import SyntheticSFTDataModule
from lightning_peft.heads import HeadError, SparseAdapter
from lightning_peft.heads.bottleneck import adapters

cpu_threads()


def _module(**kw):
    kw.setdefault("base", {"placement": "houlsby", "bottleneck": 8})
    torch.manual_seed(0)
    return CausalLM(backbone="tiny-llama", head=SparseAdapter(**kw))


def _weights(model):
    return {f"{n}.{k}": getattr(a, k) for n, a in adapters(model) for k in ("down_weight", "up_weight")}


def _masks(model):
    return {f"{n}.{k}": getattr(a, k.replace("weight", "mask")) for n, a in adapters(model)
            for k in ("down_weight", "up_weight")}


@pytest.mark.parametrize("sparsity", [0.4, 0.8])
def test_global_scope_keeps_exactly_one_minus_sparsity(sparsity):
    module = _module(sparsity=sparsity, criterion="magnitude")
    original = {n: w.detach().abs().clone() for n, w in _weights(module.model).items()}
    module.head.on_fit_start(module.model, 10)
    weights = _weights(module.model)
    total = sum(w.numel() for w in weights.values())
    kept = sum(int(torch.count_nonzero(w)) for w in weights.values())  # "bert" init: no weight is 0 by chance
    assert abs(kept - (1 - sparsity) * total) <= 1
    # magnitude with one global threshold: every kept weight was at least as large as every pruned one
    masks = _masks(module.model)
    smallest_kept = min(original[n][masks[n]].min() for n in original)
    largest_pruned = max(original[n][~masks[n]].max() for n in original)
    assert smallest_kept >= largest_pruned
    per_tensor = [int(torch.count_nonzero(w)) / w.numel() for w in weights.values()]
    assert max(per_tensor) - min(per_tensor) > 0.01  # global: tensors differ in density


def test_local_scope_prunes_each_tensor_to_the_ratio():
    module = _module(sparsity=0.5, criterion="random", scope="local")
    module.head.on_fit_start(module.model, 10)
    for name, w in _weights(module.model).items():
        assert abs(int(torch.count_nonzero(w)) - 0.5 * w.numel()) <= 1, name


def test_snip_scores_are_the_mask_gradients_and_the_top_set_is_kept():
    """The official code's route: scores are |dL/dM| at M = 1 for a forward with W * M; here computed
    with float ones masks requiring grad, independently of the head's |theta * dL/dtheta|."""
    module = _module(sparsity=0.6, criterion="snip", prune_batches=2).double()
    batches = [causal_batch(n=4, seed=s) for s in (1, 2)]
    head, model = module.head, module.model
    loss_fn = lambda b: module.loss_output(b).loss  # noqa: E731

    # independent: gradients with respect to all-ones masks, summed over the two batches
    twin = copy.deepcopy(module)
    mask_leaves = []
    for _, a in adapters(twin.model):
        a.down_mask = torch.ones_like(a.down_weight, requires_grad=True)
        a.up_mask = torch.ones_like(a.up_weight, requires_grad=True)
        mask_leaves += [a.down_mask, a.up_mask]
    twin.eval()
    for b in batches:
        twin.loss_output(b).loss.backward()
    want = [leaf.grad.abs() for leaf in mask_leaves]

    params = list(_weights(model).values())
    got = head.scores(model, params, batches, loss_fn)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    # the kept set is the top 40% of those scores (sorted independently)
    head.on_calibration_batches(model, batches, loss_fn)
    flat = torch.cat([w.flatten() for w in want])
    k = round(0.4 * flat.numel())
    threshold = flat.sort(descending=True).values[k - 1]
    kept = torch.cat([m.flatten() for m in _masks(model).values()])
    assert int(kept.sum()) == k
    assert bool((flat[kept] >= threshold).all()) and bool((flat[~kept] <= threshold).all())


def test_grasp_scores_are_theta_times_hessian_gradient_by_finite_differences():
    """theta * H g against theta * (g(theta + eps g) - g(theta - eps g)) / 2 eps. On tiny-bert in float64
    with a smooth activation (Llama's RMSNorm computes in float32, and ReLU kinks spoil the difference)."""
    torch.manual_seed(0)
    module = SequenceClassifier(backbone="tiny-bert", num_labels=2, head=SparseAdapter(
        base={"placement": "houlsby", "bottleneck": 4, "activation": "tanh"}, criterion="grasp")).double()
    batch = class_batch(n=4, seed=3)
    model = module.model
    params = list(_weights(model).values())
    loss_fn = lambda b: module.loss_output(b).loss  # noqa: E731
    got = module.head.scores(model, params, [batch], loss_fn)
    module.eval()

    def grads():
        return torch.autograd.grad(loss_fn(batch), params)

    g = [x.detach() for x in grads()]
    eps = 1e-4
    with torch.no_grad():
        for p, d in zip(params, g):
            p.add_(eps * d)
    plus = grads()
    with torch.no_grad():
        for p, d in zip(params, g):
            p.sub_(2 * eps * d)
    minus = grads()
    for p, d in zip(params, g):
        p.data.add_(eps * d)
    assert max(float(s.abs().max()) for s in got) > 1e-4
    for p, s, a, b in zip(params, got, plus, minus):
        torch.testing.assert_close(s, p.detach() * (a - b) / (2 * eps), rtol=1e-6, atol=1e-9)


def test_synflow_scores_follow_the_closed_form():
    """R = 1^T |U| |D| 1: dR/dD_ij = sum_k |U_ki|, dR/dU_ki = sum_j |D_ij|."""
    module = _module(criterion="synflow")
    params = list(_weights(module.model).values())
    got = module.head.scores(module.model, params, [], None)
    for (d, u), (sd, su) in zip(zip(params[0::2], params[1::2]), zip(got[0::2], got[1::2])):
        d, u = d.detach().abs().double(), u.detach().abs().double()
        torch.testing.assert_close(sd.double(), d * u.sum(0)[:, None], rtol=1e-6, atol=0)
        torch.testing.assert_close(su.double(), u * d.sum(1)[None, :], rtol=1e-6, atol=0)


def test_masked_weights_stay_zero_through_50_adamw_steps_and_head_save_load(tmp_path):
    module = _module(sparsity=0.5, criterion="random")
    module.head.on_fit_start(module.model, 50)
    before = {n: w.detach().clone() for n, w in _weights(module.model).items()}
    masks = {n: m.clone() for n, m in _masks(module.model).items()}
    train_steps(module, causal_batch(), steps=50, lr=1e-2, weight_decay=0.1)
    for name, w in _weights(module.model).items():
        assert torch.equal(w[~masks[name]], torch.zeros_like(w[~masks[name]])), name
        assert not torch.equal(w[masks[name]], before[name][masks[name]]), name
    module.head.save(module.model, str(tmp_path))
    fresh = _module(sparsity=0.5, criterion="random", seed=7)  # a different seed: masks come from the file
    fresh.head.load(fresh.model, str(tmp_path))
    for name, m in _masks(fresh.model).items():
        assert torch.equal(m, masks[name])
    batch = causal_batch(n=2)
    assert torch.equal(logits(fresh.eval(), batch), logits(module.eval(), batch))


def _data():
    return SyntheticSFTDataModule(task="copy", num_digits=3, num_train=32, num_val=4, batch_size=4, seed=0)


class CountCalibration(SparseAdapter):
    calls: list[int] = []

    def on_calibration_batches(self, model, batches, loss_fn):
        type(self).calls.append(len(batches))
        assert all(b["input_ids"].shape[0] == 4 for b in batches)
        super().on_calibration_batches(model, batches, loss_fn)


def test_snip_through_trainer_fit_prunes_once_and_survives_checkpoint_and_resume(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def build():
        torch.manual_seed(0)
        head = CountCalibration(base={"placement": "houlsby", "bottleneck": 8}, sparsity=0.4, criterion="snip",
                                prune_batches=3)
        module = CausalLM(backbone="tiny-llama", head=head)
        module.set_optimizer("torch.optim.AdamW", lr=1e-2, weight_decay=0.1)
        return module

    CountCalibration.calls = []
    L.seed_everything(0)
    first = build()
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "a"), every_n_train_steps=50, save_top_k=-1)
    cpu_trainer(tmp_path / "a", 50, [ckpt]).fit(first, datamodule=_data())
    assert CountCalibration.calls == [3]  # the hook got prune_batches batches from the train dataloader
    masks = {n: m.clone() for n, m in _masks(first.model).items()}
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == round(0.6 * sum(m.numel() for m in masks.values()))
    for name, w in _weights(first.model).items():
        assert not w[~masks[name]].any(), f"{name}: a pruned weight moved within 50 steps"

    path = glob.glob(str(tmp_path / "a" / "*step=50*.ckpt"))[0]
    saved = torch.load(path, map_location="cpu", weights_only=True)
    for name, m in masks.items():
        key = name.replace("_weight", "_mask")
        assert torch.equal(saved["head_extra_state"]["masks"][key], m)
        assert not saved["state_dict"][f"model.{name}"][~m].any()

    L.seed_everything(1)
    resumed = build()
    cpu_trainer(tmp_path / "b", 60).fit(resumed, datamodule=_data(), ckpt_path=path)
    assert CountCalibration.calls == [3]  # masks came from the checkpoint: no second pruning pass
    for name, w in _weights(resumed.model).items():
        assert torch.equal(_masks(resumed.model)[name], masks[name])
        assert not w[~masks[name]].any(), f"{name}: a pruned weight moved after resuming"
    assert SparseAdapter.unpruned_parameters(resumed.model) == resumed.head.expected_unpruned_parameters(
        load_backbone("tiny-llama", task="causal-lm")[0])


def test_a_data_criterion_refuses_to_step_unpruned():
    module = _module(criterion="snip")
    with pytest.raises(HeadError, match="reached an optimizer step unpruned.*Trainer.fit"):
        train_steps(module, causal_batch(), steps=1)
    with pytest.raises(HeadError, match="scores on training batches and got none"):
        module.head.prune(module.model)


def test_zero_up_with_random_scores_is_exactly_the_base():
    module = _module(base={"placement": "houlsby", "bottleneck": 8, "init": "zero_up"}, criterion="random")
    assert module.head.identity_at_init
    module.head.on_fit_start(module.model, 10)
    bare, _ = load_backbone("tiny-llama", task="causal-lm")
    batch = causal_batch(n=2)
    assert torch.equal(logits(module.eval(), batch), logits(bare.eval(), batch))


def _roberta_base():
    from transformers import RobertaConfig, RobertaModel

    with torch.device("meta"):
        return RobertaModel(RobertaConfig())


def test_counts_on_roberta_base_and_large_sparse():
    """Per instance (1 - s) 2dm + d + m non-zeros, 2L instances for Houlsby (+ 4d trained norms per block);
    Large-Sparse kappa = 2, s = 0.5 has as many non-zero weights as the dense m."""
    d, m, L_ = 768, 64, 12
    model = _roberta_base()
    head = SparseAdapter(base={"placement": "houlsby", "bottleneck": m}, sparsity=0.4)
    allocated = L_ * (2 * (2 * d * m + d + m) + 4 * d)
    assert head.expected_trainable_parameters(model) == allocated
    unpruned = head.expected_unpruned_parameters(model)
    assert abs(unpruned - (2 * L_ * (0.6 * 2 * d * m + d + m) + L_ * 4 * d)) <= 1
    large = SparseAdapter(base={"placement": "houlsby", "bottleneck": m}, sparsity=None, large_sparse=2)
    assert large.effective_sparsity == 0.5
    assert large.expected_unpruned_parameters(model) == 2 * L_ * (2 * d * m + d + 2 * m) + L_ * 4 * d
    dense_m = SparseAdapter(base={"placement": "houlsby", "bottleneck": m}, sparsity=0.0)
    assert large.expected_unpruned_parameters(model) - dense_m.expected_unpruned_parameters(model) == 2 * L_ * m
    head.attach(model)
    from lightning_peft.heads import Head

    assert Head.trainable_parameters(model) == allocated


def test_large_sparse_on_a_real_model_keeps_the_dense_count_of_weights():
    torch.manual_seed(0)
    module = SequenceClassifier(backbone="tiny-bert", num_labels=2, head=SparseAdapter(
        base={"placement": "pfeiffer", "bottleneck": 4}, sparsity=None, large_sparse=2, criterion="magnitude"))
    module.head.on_fit_start(module.model, 10)
    weights = _weights(module.model)
    assert all(w.shape[0] * w.shape[1] == 8 * 64 for w in weights.values())  # m' = 8
    assert sum(int(torch.count_nonzero(w)) for w in weights.values()) == 2 * 2 * 64 * 4  # = dense m = 4
    assert SparseAdapter.unpruned_parameters(module.model) == module.expected_trainable_parameters - 2 * 2 * 64 * 4


@pytest.mark.parametrize("kwargs,match", [
    ({"criterion": "snipp"}, "criterion='snipp' is unknown"),
    ({"sparsity": 1.0}, r"sparsity=1.0 must be in \[0, 1\)"),
    ({"scope": "layer"}, "scope='layer' is unknown"),
    ({"sparsity": None}, "sparsity=None needs large_sparse"),
    ({"large_sparse": 2}, "leave sparsity unset"),
    ({"base": {"bottleneck_size": 8}}, "base=.*has a key BottleneckAdapter does not take"),
    ({"base": {"placement": "parallel"}}, "placement='parallel' is unknown"),
    ({"prune_batches": 0}, "prune_batches=0 must be a positive integer"),
])
def test_bad_configs_name_the_value(kwargs, match):
    with pytest.raises(HeadError, match=match):
        SparseAdapter(**kwargs)


@pytest.mark.ddp
def test_snip_under_two_rank_ddp_prunes_the_same_entries_on_both_ranks(tmp_path):
    """Each rank scores its own shard's batches; the scores are summed over ranks, so the masks (and the
    trained weights) agree, and the pruned entries are still zero after the steps."""
    from helpers import REPO, run_cli_ranks

    extra = tmp_path / "dump.yaml"
    extra.write_text("trainer:\n  callbacks:\n    - class_path: helpers.DumpTrainable\n"
                     f"      init_args: {{out_dir: {tmp_path / 'dump'}}}\n")
    args = ["--config", str(REPO / "examples" / "sparseadapter_copy.yaml"), "--config", str(extra),
            "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
            "--trainer.max_steps", "4", "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "run"),
            "--data.init_args.num_train", "256", "--data.init_args.batch_size", "8"]
    r0, r1 = run_cli_ranks(args, tmp_path, tmp_path / "dump")
    weights = [n for n in r0["trainable"] if n.endswith(("down_weight", "up_weight"))]
    assert weights
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), f"ranks differ on {name}"
    total = sum(r0["params"][n].numel() for n in weights)
    zeros = sum(int((r0["params"][n] == 0).sum()) for n in weights)
    assert abs(zeros - 0.4 * total) <= 1
