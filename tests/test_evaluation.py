"""GSM8K answer extraction / exact match, and batched greedy generation."""

from __future__ import annotations

import pytest
import torch
from helpers import cpu_threads

from lightning_peft import CausalLM
from lightning_peft.generation import generate_answers
from lightning_peft.heads import LoRA
from lightning_peft.metrics import GSM8KExactMatch, extract_gsm8k_answer, gsm8k_exact_match, normalize_number

cpu_threads()


@pytest.mark.parametrize(
    "text,want",
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),
        ("#### 1,000", "1000"),
        ("#### $18.00", "18"),
        ("####18", "18"),
        ("The answer is 18.0", "18"),
        ("so she pays $1,234.50.", "1234.5"),
        ("He has 5 apples. Then 3 more. Total 8.", "8"),  # sentence-ending dot
        ("10 - 4 = 6", "6"),  # a spaced minus is an operator, not a sign
        ("ages 3-4", "4"),  # a joined minus is a range, not a sign
        ("The temperature is -7 degrees", "-7"),
        ("about .5 of it", "0.5"),
        ("#### 7\nQuestion: Tom has 12 cats", "7"),  # after ####, not the last number
        ("#### 1,000\n#### 7", "7"),  # the last ####
        ("#### none\nso 42 it is", "42"),  # a #### without a number falls back to the last number
        ("50% of them", "50"),
        ("<<3*4=12>>12 apples", "12"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_gsm8k_answer(text, want):
    assert extract_gsm8k_answer(text) == want


def test_normalize_number_and_exact_match():
    assert normalize_number("18.0") == normalize_number("18") == normalize_number("$18.") == "18"
    assert normalize_number("-0.0") == "0" and normalize_number("2.50") == "2.5" and normalize_number("x") is None
    reference = "Janet has 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 9"
    assert gsm8k_exact_match("She sells 9 eggs, so the answer is 9.", reference)
    assert gsm8k_exact_match("#### 9.00", reference) and gsm8k_exact_match("9", "9")
    assert not gsm8k_exact_match("#### 18", reference)
    assert not gsm8k_exact_match("The answer is 9 eggs, earning 18", reference)  # the last number counts
    assert not gsm8k_exact_match("", reference) and not gsm8k_exact_match("9", "no answer")


def test_gsm8k_exact_match_metric():
    metric = GSM8KExactMatch()
    metric.update(["#### 9", "it is 10", "nothing"], ["#### 9", "#### 10.0", "#### 3"])
    metric.update(["#### 1,200"], ["#### 1200"])
    assert float(metric.compute()) == pytest.approx(0.75)
    metric.reset()
    assert float(metric.compute()) == 0.0
    with pytest.raises(ValueError, match="2 predictions for 1"):
        metric.update(["1", "2"], ["1"])
    with pytest.raises(TypeError):
        metric.update("1", "1")


# ------------------------------------------------------------------------------------- generation
PROMPTS = ["Question: 1+1?\nAnswer: ", "Hi", "Question: what is twelve times twelve?\nAnswer: ", "abc", "7 8 9"]


@pytest.fixture(scope="module")
def trained_module():
    """tiny-llama + LoRA with moved adapter weights (the adapter must be part of what generates).

    Generation on a model this small is per-op overhead, which one thread runs fastest (and a second
    thread waiting on a busy core can make it many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = CausalLM(backbone="tiny-llama", head=LoRA(r=4, alpha=8))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    yield module.train()
    torch.set_num_threads(threads)


def test_batched_generation_equals_one_at_a_time(trained_module):
    batched = generate_answers(trained_module, prompts=PROMPTS, max_new_tokens=10, batch_size=3, progress=False)
    single = [
        generate_answers(trained_module, prompts=[p], max_new_tokens=10, batch_size=1, progress=False)[0]
        for p in PROMPTS
    ]
    assert batched == single
    assert trained_module.training  # the module's mode is restored
    assert all(len(a) > 0 for a in batched)
    # the plain model + tokenizer give the same, and the answers follow the input order
    plain = generate_answers(
        trained_module.model, trained_module.tokenizer, PROMPTS[::-1], max_new_tokens=10, batch_size=5, progress=False
    )
    assert plain == batched[::-1]
    # right padding would break it: the shorter prompts would continue from pad positions
    tok = trained_module.tokenizer
    enc = tok(PROMPTS[:2], padding=True, return_tensors="pt")
    assert tok.padding_side == "right" and enc["attention_mask"][1, -1] == 0
    with torch.no_grad():
        gen = trained_module.model.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    right = tok.decode(gen[1, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert right != single[1]


def test_generation_without_pad_token_and_stop_strings(trained_module):
    import copy

    tok = copy.deepcopy(trained_module.tokenizer)
    want = generate_answers(trained_module, prompts=PROMPTS, max_new_tokens=8, batch_size=5, progress=False)
    tok.pad_token = None
    assert tok.pad_token_id is None
    got = generate_answers(trained_module.model, tok, PROMPTS, max_new_tokens=8, batch_size=5, progress=False)
    assert got == want  # padded with EOS, hidden by the attention mask
    stop = want[0][2:4]
    cut = generate_answers(trained_module, prompts=PROMPTS[:1], max_new_tokens=8, stop_strings=[stop], progress=False)
    assert cut == [want[0].split(stop, 1)[0]] and stop not in cut[0]
    early = generate_answers(
        trained_module,
        prompts=PROMPTS,
        max_new_tokens=8,
        batch_size=5,
        progress=False,
        stop_when=lambda text: len(text) >= 2,
    )
    assert all(w.startswith(e) and 2 <= len(e) < len(w) for e, w in zip(early, want))  # per row, kept whole
    tok.eos_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an EOS"):
        generate_answers(trained_module.model, tok, PROMPTS, progress=False)
