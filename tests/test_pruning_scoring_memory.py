"""The fast scoring route's transient memory (issue 12, defect 6): with all-linear LoRA the no-grad pass
must not hold a merged copy ``W + s B A`` of every adapted weight at once; its extra memory stays below
one adapted weight. Also: the route computes the plain eval-mode forward (dropout off) of the module."""

from __future__ import annotations

import weakref

import pytest
import torch
from helpers import cpu_threads
from pruning_helpers import padded_batch
from pruning_helpers import randomised as _randomised
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightning_peft import CausalLM
from lightning_peft.datamodules.pruning.scoring import fast_parts, score_tokens, token_stats
from lightning_peft.heads import LoRA

cpu_threads()

#: weights (hidden 256, MLP 1024: the largest linear has 1 MiB of fp32) dwarf the activations of a
#: 4 x 12 batch (an MLP activation is 48 x 1024 x 4 B = 192 KiB)
CONFIG = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4,
          "num_key_value_heads": 2}


class LiveStorageBytes(TorchDispatchMode):
    """Tracks the bytes of tensor storages allocated by ops inside the mode and still alive, and their peak.

    A storage counts from the op that creates it (an output whose storage is no input's: views and in-place
    results are not new memory) until its last tensor dies (a weakref finalizer on the storage object).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in inputs or key in self._seen:
                continue
            self._seen.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key, storage.nbytes())
        return out


def _adapted_weight_bytes(module):
    from peft.tuners.lora import Linear as LoraLinear

    return [m.base_layer.weight.nbytes for m in module.model.modules() if isinstance(m, LoraLinear)]


def test_live_storage_tracker_counts_what_is_alive():
    """The tracker itself: 4 MiB held, then freed, then a 1 MiB temporary; views cost nothing."""
    with LiveStorageBytes() as mode:
        a = torch.zeros(1 << 20)  # 4 MiB
        v = a.view(2, -1).t()  # a view: no new memory
        b = torch.zeros(1 << 18) + 1  # the zeros die at once, the sum lives: 1 MiB
        del a
        assert mode.live == (5 << 20)  # the view keeps a's storage alive
        del v
        assert mode.live == (1 << 20)
        del b
    assert mode.live == 0 and mode.peak == (5 << 20) + (1 << 20)  # a + b + b's transient zeros


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj", "lm_head"]], ids=["all-linear", "with-lm-head"])
def test_fast_route_holds_no_merged_copy_of_the_model(targets):
    torch.manual_seed(0)
    module = _randomised(CausalLM(backbone="tiny-llama", backbone_config=CONFIG,
                                  head=LoRA(r=8, alpha=16, target_modules=targets))).train()
    batch = padded_batch(module.tokenizer, seed=5)
    pos = batch["labels"] != -100
    pos[:, 0] = False
    assert fast_parts(module, batch) is not None  # the fast route is really taken
    sizes = _adapted_weight_bytes(module)
    assert len(sizes) >= 28 and sum(sizes) > 8 * max(sizes)  # the test can tell one weight from all of them
    with LiveStorageBytes() as mode:
        loss, ent = score_tokens(module, batch, pos)
    # old code: every merged weight alive at once (>= sum(sizes)); per layer: one merged weight + activations
    assert mode.peak < 2 * max(sizes), (mode.peak, max(sizes), sum(sizes))
    assert module.training  # the mode is restored
    # and the values are the module's plain eval-mode forward
    module.eval()
    with torch.no_grad():
        ref_loss, ref_ent = token_stats(module(batch).logits, batch["labels"], pos)
    module.train()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)


def test_fast_route_runs_with_lora_dropout_off():
    """With ``lora_dropout > 0`` and the module in train mode, the fast route computes the eval-mode forward:
    two calls agree exactly, and both equal the eval-mode reference (a dropout mask would move them)."""
    torch.manual_seed(0)
    module = _randomised(CausalLM(backbone="tiny-llama", head=LoRA(r=4, alpha=8, dropout=0.5))).train()
    batch = padded_batch(module.tokenizer, seed=6)
    pos = batch["labels"] != -100
    pos[:, 0] = False
    assert fast_parts(module, batch) is not None
    first, second = score_tokens(module, batch, pos), score_tokens(module, batch, pos)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    with torch.no_grad():
        train_loss, _ = token_stats(module(batch).logits, batch["labels"], pos)  # dropout on: differs
        module.eval()
        ref_loss, ref_ent = token_stats(module(batch).logits, batch["labels"], pos)
        module.train()
    assert not torch.allclose(train_loss, ref_loss, rtol=1e-3)
    torch.testing.assert_close(first[0], ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first[1], ref_ent, rtol=1e-5, atol=1e-5)


def test_on_the_fly_merge_leaves_no_patched_forward_and_equals_the_adapter_path():
    """After the pass every LoRA layer has its class ``forward`` back, and the merged product equals the
    adapter path ``W x + s B (A x)`` computed by peft itself (eval mode) at every adapted layer."""
    from lightning_peft.datamodules.pruning.scoring import _merged_one_layer_at_a_time

    torch.manual_seed(0)
    module = _randomised(CausalLM(backbone="tiny-llama", head=LoRA(r=4, alpha=8, target_modules="all-linear")))
    module.eval()
    layers = fast_parts(module, padded_batch(module.tokenizer, seed=1))[2]
    x = torch.randn(3, 5, layers[0].in_features)
    with torch.no_grad():
        want = layers[0](x)
        with _merged_one_layer_at_a_time(layers):
            assert all("forward" in layer.__dict__ for layer in layers)
            got = layers[0](x)
            with module.model.disable_adapter():  # switched off meanwhile: the base layer alone
                base = layers[0](x)
    assert all("forward" not in layer.__dict__ for layer in layers)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(base, layers[0].base_layer(x))
    assert not torch.allclose(base, want, atol=1e-4)  # the adapter really moves the output
