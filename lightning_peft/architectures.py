"""One table of model-architecture facts, per ``transformers`` model family.

Every component that reaches into a backbone (callbacks, pruners, heads, tests) asks this module where
things are instead of writing module names out itself: the block list(s), each block's attention
projections (separate q/k/v/o or one fused qkv), q/k norms, MLP projections, block norms, the final
norm, the embeddings, the LM head, the positional scheme and what a component that re-implements
attention needs to know (heads, kv heads, head_dim, scaling, rotary module).

A family is matched by ``model.config.model_type`` after unwrapping Lightning, DDP and peft wrappers
(:func:`unwrap`). Paths are dotted attribute paths:

* ``Architecture.blocks``, ``embeddings``, ``final_norm``, ``rotary`` are relative to the
  ``transformers`` *base model* (``PreTrainedModel.base_model``, i.e. the ``base_model_prefix``
  submodule, or the model itself when it is the bare base model, e.g. ``LlamaModel`` or T5);
* every block role (``Architecture.roles``) is relative to one block;
* ``lm_head`` is relative to the task model (``LlamaForCausalLM``, ``BertForMaskedLM`` ...).

Adding a family is one entry in :data:`ARCHITECTURES` (plus one tiny-config line in
``tests/test_architectures.py``). Usage::

    arch = architecture_of(model)                 # raises UnsupportedArchitecture for unknown families
    for block in blocks(model):
        mods = block_modules(block, arch)         # {"q": Linear, "k": ..., "down": ..., "attn_norm": ...}
    facts = attention_facts(model)                # heads, kv_heads, head_dim, scaling, rotary module ...
    parts = attention_parts(model, -1)            # last block's attention: parts.states(x) -> q, k, v heads
    require(model, component="TokenElimination", needs=("causal", "rope", "split_qkv"))
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

# ---------------------------------------------------------------------------------------------- table


@dataclass(frozen=True)
class Attention:
    """Where one block's self-attention lives; projection paths are relative to the block.

    ``qkv_layout`` describes a fused projection's output rows: ``"stacked"`` is ``[q | k | v]`` (GPT-2
    ``c_attn``, Phi-3 ``qkv_proj`` with GQA widths), ``"per_head"`` is ``[q_h, k_h, v_h]`` for each
    head in turn (GPT-NeoX and BLOOM ``query_key_value``).
    """

    module: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    o: str | None = None
    qkv: str | None = None
    qkv_layout: str | None = None
    q_norm: str | None = None
    k_norm: str | None = None
    cross: str | None = None  # encoder-decoder cross-attention module (T5 decoder blocks)
    gqa: bool = False  # config.num_key_value_heads may be smaller than num_attention_heads
    head_dim: str | None = None  # config attribute holding head_dim; None = hidden_size // heads
    scaling: str = "inv_sqrt_head_dim"  # or "query_pre_attn_scalar" (Gemma-2) or "none" (T5)
    softcap: str | None = None  # config attribute of the attention-logit soft cap (Gemma-2)
    rotary_fraction: str | None = None  # config attribute: share of head_dim that is rotated (GPT-NeoX)


@dataclass(frozen=True)
class MLP:
    """One block's feed-forward projections, relative to the block.

    ``up`` is the input projection (``fc1``/``c_fc``/``dense_h_to_4h``/``wi``), ``down`` the output one
    (``fc2``/``c_proj``/``dense_4h_to_h``/``wo``); ``gate`` is set for gated MLPs with a separate gate and
    ``gate_up`` when gate and up are one fused matrix (Phi-3).
    """

    up: str | None = None
    down: str | None = None
    gate: str | None = None
    gate_up: str | None = None


@dataclass(frozen=True)
class Architecture:
    """Facts about one model family. See the module docstring for what each path is relative to."""

    model_type: str
    name: str
    blocks: tuple[str, ...]
    attention: Attention
    mlp: MLP
    norms: dict[str, str]  # block norms: role -> path in the block ("attn_norm", "mlp_norm", ...)
    final_norm: tuple[str, ...]  # one per block stack (T5: encoder, decoder)
    embeddings: str
    lm_head: str | None
    positional: str  # "rope" | "learned" | "alibi" | "relative_bias"
    causal: bool  # a causal decoder-only language model
    rotary: str | None = None  # rotary-embedding module, relative to the base model
    position_embeddings: str | None = None  # learned absolute position table, relative to the base model
    extra_roles: dict[str, str] = field(default_factory=dict)  # other per-block modules worth naming
    logit_softcap: str | None = None  # config attribute of a soft cap applied to the LM head's logits (Gemma-2)

    @property
    def roles(self) -> dict[str, str]:
        """Every per-block role this family has -> its dotted path inside a block."""
        a, m = self.attention, self.mlp
        out = {"attention": a.module}
        for role in ("q", "k", "v", "o", "qkv", "q_norm", "k_norm", "cross"):
            if getattr(a, role):
                out[role] = getattr(a, role)
        for role in ("gate", "up", "down", "gate_up"):
            if getattr(m, role):
                out[role] = getattr(m, role)
        out.update(self.norms)
        out.update(self.extra_roles)
        return out

    @property
    def capabilities(self) -> frozenset[str]:
        """Names usable in :func:`require` ``needs=`` that this family satisfies (see :data:`NEEDS`)."""
        a = self.attention
        caps = {"lm_head"} if self.lm_head else set()
        if self.causal:
            caps.add("causal")
        if self.positional == "rope":
            caps.add("rope")
            if a.rotary_fraction is None:
                caps.add("full_rotary")
        if a.q and a.k and a.v:
            caps.add("split_qkv")
        if not (a.q_norm or a.k_norm):
            caps.add("plain_qk")
        if a.scaling == "inv_sqrt_head_dim" and a.softcap is None:
            caps.add("plain_scores")
        if self.positional in ("rope", "learned"):
            caps.add("unbiased_scores")
        if self.lm_head and self.logit_softcap is None:
            caps.add("plain_logits")
        if self.mlp.gate:
            caps.add("gated_mlp")
        if len(self.blocks) == 1:
            caps.add("single_stack")
        return frozenset(caps)


def _llama_like(model_type: str, name: str, **attention: Any) -> Architecture:
    return Architecture(
        model_type=model_type,
        name=name,
        blocks=("layers",),
        attention=Attention(
            module="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
            o="self_attn.o_proj", gqa=True, head_dim="head_dim", **attention,
        ),
        mlp=MLP(gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj"),
        norms={"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
        final_norm=("norm",),
        embeddings="embed_tokens",
        lm_head="lm_head",
        positional="rope",
        causal=True,
        rotary="rotary_emb",
    )


def _entries() -> list[Architecture]:
    gemma2 = _llama_like("gemma2", "Gemma-2", scaling="query_pre_attn_scalar", softcap="attn_logit_softcapping")
    gemma2 = replace(gemma2, logit_softcap="final_logit_softcapping", norms={
        "attn_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
        "mlp_norm": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm"})
    phi3 = replace(_llama_like("phi3", "Phi-3"),
                   attention=Attention(module="self_attn", qkv="self_attn.qkv_proj", qkv_layout="stacked",
                                       o="self_attn.o_proj", gqa=True, head_dim="head_dim"),
                   mlp=MLP(gate_up="mlp.gate_up_proj", down="mlp.down_proj"))
    encoder = dict(
        blocks=("encoder.layer",),
        attention=Attention(module="attention", q="attention.self.query", k="attention.self.key",
                            v="attention.self.value", o="attention.output.dense"),
        mlp=MLP(up="intermediate.dense", down="output.dense"),
        norms={"attn_norm": "attention.output.LayerNorm", "mlp_norm": "output.LayerNorm"},
        final_norm=(),  # post-norm encoders: the last block's output LayerNorm is the last norm
        embeddings="embeddings.word_embeddings",
        position_embeddings="embeddings.position_embeddings",
        positional="learned",
        causal=False,
    )
    return [
        _llama_like("llama", "Llama"),
        _llama_like("mistral", "Mistral"),
        _llama_like("qwen2", "Qwen2"),
        _llama_like("qwen3", "Qwen3", q_norm="self_attn.q_norm", k_norm="self_attn.k_norm"),
        _llama_like("gemma", "Gemma"),
        gemma2,
        phi3,
        Architecture(
            model_type="gpt2", name="GPT-2", blocks=("h",),
            attention=Attention(module="attn", qkv="attn.c_attn", qkv_layout="stacked", o="attn.c_proj"),
            mlp=MLP(up="mlp.c_fc", down="mlp.c_proj"),
            norms={"attn_norm": "ln_1", "mlp_norm": "ln_2"}, final_norm=("ln_f",),
            embeddings="wte", position_embeddings="wpe", lm_head="lm_head", positional="learned", causal=True,
        ),
        Architecture(
            model_type="gpt_neox", name="GPT-NeoX", blocks=("layers",),
            attention=Attention(module="attention", qkv="attention.query_key_value", qkv_layout="per_head",
                                o="attention.dense", rotary_fraction="rotary_pct"),
            mlp=MLP(up="mlp.dense_h_to_4h", down="mlp.dense_4h_to_h"),
            norms={"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
            final_norm=("final_layer_norm",), embeddings="embed_in", lm_head="lm_head", positional="rope",
            causal=True, rotary="rotary_emb",
        ),
        Architecture(
            model_type="opt", name="OPT", blocks=("decoder.layers",),
            attention=Attention(module="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                                o="self_attn.out_proj"),
            mlp=MLP(up="fc1", down="fc2"),
            norms={"attn_norm": "self_attn_layer_norm", "mlp_norm": "final_layer_norm"},
            final_norm=("decoder.final_layer_norm",), embeddings="decoder.embed_tokens",
            position_embeddings="decoder.embed_positions", lm_head="lm_head", positional="learned", causal=True,
        ),
        Architecture(
            model_type="bloom", name="BLOOM", blocks=("h",),
            attention=Attention(module="self_attention", qkv="self_attention.query_key_value", qkv_layout="per_head",
                                o="self_attention.dense"),
            mlp=MLP(up="mlp.dense_h_to_4h", down="mlp.dense_4h_to_h"),
            norms={"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
            final_norm=("ln_f",), embeddings="word_embeddings", lm_head="lm_head", positional="alibi", causal=True,
        ),
        Architecture(model_type="bert", name="BERT", lm_head="cls.predictions.decoder", **encoder),
        Architecture(model_type="roberta", name="RoBERTa", lm_head="lm_head.decoder", **encoder),
        Architecture(
            model_type="t5", name="T5", blocks=("encoder.block", "decoder.block"),
            attention=Attention(module="layer.0.SelfAttention", q="layer.0.SelfAttention.q",
                                k="layer.0.SelfAttention.k", v="layer.0.SelfAttention.v",
                                o="layer.0.SelfAttention.o", cross="layer.1.EncDecAttention", head_dim="d_kv",
                                scaling="none"),
            # The FF sublayer is the last entry of ``block.layer``: index 1 in encoder blocks, 2 in decoder
            # blocks (after cross-attention); :func:`block_modules` resolves ``layer.-1``.
            mlp=MLP(up="layer.-1.DenseReluDense.wi", down="layer.-1.DenseReluDense.wo"),
            norms={"attn_norm": "layer.0.layer_norm", "mlp_norm": "layer.-1.layer_norm"},
            final_norm=("encoder.final_layer_norm", "decoder.final_layer_norm"), embeddings="shared",
            lm_head="lm_head", positional="relative_bias", causal=False,
        ),
    ]


#: ``model_type`` -> :class:`Architecture`; adding a family is one entry here.
ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in _entries()}

#: What each :func:`require` need means, and how to say that a family lacks it.
NEEDS: dict[str, str] = {
    "causal": "a causal decoder-only language model",
    "rope": "rotary position embeddings",
    "full_rotary": "rotary embeddings over the whole head dimension",
    "split_qkv": "separate q/k/v projections",
    "plain_qk": "queries and keys without q/k norms",
    "plain_scores": "attention scores scaled by 1/sqrt(head_dim) without soft-capping",
    "lm_head": "a language-model head",
    "plain_logits": "logits that are the LM head applied to the body's last hidden state",
    "unbiased_scores": "positions that enter through rotary or input embeddings, not as attention biases",
    "gated_mlp": "a gated MLP with separate gate/up/down projections",
    "single_stack": "one stack of blocks",
}


class UnsupportedArchitecture(ValueError):
    """The model's family is not in :data:`ARCHITECTURES`, or lacks what a component needs."""


# ---------------------------------------------------------------------------------------------- resolution


def unwrap(model: nn.Module) -> nn.Module:
    """The ``transformers`` model inside Lightning modules (``.model``), DDP (``.module``) and peft
    wrappers (``get_base_model()``); a ``transformers`` model is returned as it is."""
    from transformers import PreTrainedModel

    for _ in range(16):
        if isinstance(model, PreTrainedModel):
            return model
        if hasattr(model, "get_base_model") and model.get_base_model() is not model:
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        elif isinstance(getattr(model, "model", None), nn.Module):
            model = model.model
        else:
            break
    return model


def _known() -> str:
    return ", ".join(sorted(ARCHITECTURES))


def architecture_of(model: nn.Module) -> Architecture:
    """The table entry for ``model`` (any wrapper), or :class:`UnsupportedArchitecture` in one sentence."""
    hf = unwrap(model)
    model_type = getattr(getattr(hf, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} ({type(hf).__name__}) is not in the architecture table (known: {_known()}); "
            "adding a family is one entry in ARCHITECTURES in lightning_peft/architectures.py."
        )
    return ARCHITECTURES[model_type]


def get_path(root: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path`` (integer parts index ModuleLists; ``-1`` is the last entry)."""
    node: Any = root
    for part in path.split(".") if path else ():
        if part.lstrip("-").isdigit():
            node = node[int(part)]
        else:
            node = getattr(node, part)
    return node


def base_model(model: nn.Module) -> nn.Module:
    """The ``transformers`` base model (``PreTrainedModel.base_model``) of any wrapped model."""
    hf = unwrap(model)
    return getattr(hf, "base_model", hf)


def block_stacks(model: nn.Module) -> list[nn.ModuleList]:
    """Every block list of ``model`` in table order (T5: encoder, decoder)."""
    arch = architecture_of(model)
    body = base_model(model)
    return [get_path(body, p) for p in arch.blocks]


def blocks(model: nn.Module) -> list[nn.Module]:
    """All blocks of ``model``, stacks concatenated in table order (T5: encoder blocks, then decoder)."""
    return [b for stack in block_stacks(model) for b in stack]


def block_modules(block: nn.Module, arch: Architecture) -> dict[str, nn.Module]:
    """``{role: module}`` for every role of ``arch`` that this block has (T5 encoder blocks have no
    ``cross``). Modules are returned as found, i.e. peft-wrapped layers stay wrapped."""
    out = {}
    for role, path in arch.roles.items():
        try:
            out[role] = get_path(block, path)
        except (AttributeError, IndexError):
            continue
    return out


def embeddings(model: nn.Module) -> nn.Module:
    """The token-embedding module."""
    return get_path(base_model(model), architecture_of(model).embeddings)


def final_norms(model: nn.Module) -> list[nn.Module]:
    """The final norm of each block stack (empty for post-norm encoders such as BERT)."""
    body = base_model(model)
    return [get_path(body, p) for p in architecture_of(model).final_norm]


def lm_head(model: nn.Module) -> nn.Module:
    """The LM-head linear of a task model with one; :class:`UnsupportedArchitecture` otherwise."""
    arch = architecture_of(model)
    hf = unwrap(model)
    if arch.lm_head:
        try:
            return get_path(hf, arch.lm_head)
        except AttributeError:
            pass
    raise UnsupportedArchitecture(
        f"{type(hf).__name__} (model_type {arch.model_type!r}) has no language-model head; "
        f"load it as a language model (e.g. AutoModelForCausalLM) instead."
    )


def out_features(module: nn.Module) -> int:
    """Output width of a Linear, a GPT-2 ``Conv1D`` (weight ``[in, out]``) or a peft layer wrapping either."""
    if hasattr(module, "get_base_layer"):
        module = module.get_base_layer()
    if isinstance(module, nn.Linear):
        return module.out_features
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D stores the weight transposed
        return module.weight.shape[1]
    if isinstance(module, nn.Embedding):
        return module.num_embeddings
    raise TypeError(f"cannot tell the output width of {type(module).__name__}")


_POSITIONAL = {"learned": "learned absolute positions", "alibi": "ALiBi biases",
               "relative_bias": "relative position biases", "rope": "rotary embeddings"}


def _lacks(arch: Architecture, need: str) -> str:
    """How ``arch`` falls short of ``need``, as a phrase."""
    a = arch.attention
    detail = {
        "causal": "it is " + ("an encoder-decoder" if len(arch.blocks) > 1 else "a bidirectional encoder"),
        "rope": "it uses " + _POSITIONAL.get(arch.positional, arch.positional),
        "full_rotary": f"it rotates only part of each head (config {a.rotary_fraction})",
        "split_qkv": f"it has one fused {a.qkv}",
        "plain_qk": f"it normalises q and k ({a.q_norm}, {a.k_norm})",
        "plain_scores": "it scales scores by query_pre_attn_scalar and soft-caps them"
        if a.scaling == "query_pre_attn_scalar" else "its scores are not scaled by 1/sqrt(head_dim)",
        "lm_head": "it has no language-model head",
        "plain_logits": f"it soft-caps the logits (config {arch.logit_softcap})",
        "unbiased_scores": "it adds " + _POSITIONAL.get(arch.positional, arch.positional) + " to the scores",
        "gated_mlp": "its MLP is not gated with separate gate/up/down",
        "single_stack": f"it has {len(arch.blocks)} block stacks",
    }.get(need, "it does not have it")
    return f"{NEEDS[need]} ({detail})"


def require(model: nn.Module, component: str, needs: tuple[str, ...] = (),
            families: tuple[str, ...] | None = None,
            error: type[ValueError] = UnsupportedArchitecture) -> Architecture:
    """The table entry of ``model`` if it has every capability in ``needs`` (names from :data:`NEEDS`)
    and, when ``families`` is given, its ``model_type`` is one of them; otherwise ``error`` (a
    ValueError subclass) in one sentence naming ``component``, the ``model_type`` and what is missing."""
    unknown = [n for n in needs if n not in NEEDS]
    if unknown:
        raise ValueError(f"require(needs=...) got unknown need {unknown[0]!r}; known needs: {', '.join(NEEDS)}.")
    try:
        arch = architecture_of(model)
    except UnsupportedArchitecture as exc:
        raise error(f"{component} cannot run on this model: {exc}") from None
    missing = [n for n in needs if n not in arch.capabilities]
    if "rope" in missing and "full_rotary" in missing:  # one reason is enough
        missing.remove("full_rotary")
    if missing:
        raise error(f"{component} cannot run on model_type {arch.model_type!r} ({arch.name}): it needs "
                    + "; ".join(_lacks(arch, n) for n in missing) + ".")
    if families is not None and arch.model_type not in families:
        raise error(f"{component} supports model_type {', '.join(families)} and not {arch.model_type!r} "
                    f"({arch.name}); use one of those families.")
    return arch


# the attention recipe (AttentionFacts, AttentionParts) lives in its own file; importable from here
from lightning_peft.architecture_attention import (  # noqa: E402
    AttentionFacts,
    AttentionParts,
    attention_facts,
    attention_parts,
)

__all__ = [
    "ARCHITECTURES", "NEEDS", "MLP", "Architecture", "Attention", "AttentionFacts", "AttentionParts",
    "UnsupportedArchitecture", "architecture_of", "attention_facts", "attention_parts", "base_model",
    "block_modules", "block_stacks", "blocks", "embeddings", "final_norms", "get_path", "lm_head", "out_features",
    "require", "unwrap",
]
