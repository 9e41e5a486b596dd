"""HalfFineTuning's block layout: which tensors of each block form each category (attention, FFN, norms).

The block list and each block's roles come from the architecture table
(:mod:`lightning_peft.architectures`), so every family in the table with one stack of blocks is
supported; a family the table lacks (or T5's two stacks) is refused in one sentence. Per block:

* ``attention``: the table's ``q``, ``k``, ``v``, ``o`` (or the fused ``qkv`` and ``o``: GPT-2, Phi-3,
  GPT-NeoX, BLOOM);
* ``ffn``: ``gate``, ``up``, ``down`` (or the fused ``gate_up`` and ``down``: Phi-3; ``up``, ``down``
  for ungated MLPs: GPT-2, OPT, BERT ...);
* ``norm``: the block norms the table lists (2 in most families, 4 in Gemma-2).

``groups`` (category -> regexes matching in full one module name relative to a block) replaces the
table's categories; for a model the table does not know, ``blocks`` (the dotted path of its block
``nn.ModuleList``) says where the blocks are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from lightning_peft import architectures as A


class HFTError(ValueError):
    """A configuration HalfFineTuning cannot run with (one sentence naming the value and the fix)."""


ATTENTION_ROLES = ("q", "k", "v", "qkv", "o")
FFN_ROLES = ("gate", "up", "gate_up", "down")
# the table's block-norm roles, in block order (Gemma-2 has four)
NORM_ROLES = ("attn_norm", "post_attn_norm", "mlp_norm", "post_mlp_norm")


@dataclass
class Slot:
    """One selectable unit: a module's weight and bias in one block."""

    layer: int
    label: str
    params: list[str]
    numel: int


@dataclass
class Layout:
    arch: str
    blocks: str  # dotted name of the block list in the attached model
    n_layers: int
    columns: dict[str, list[str]]  # category -> labels of its tensors
    slots: dict[str, list[list[Slot]]]  # category -> block -> slots (in column order)
    embeddings: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)  # outside the blocks: final norm, pooler, classifier, ...
    uncovered: list[str] = field(default_factory=list)  # inside the blocks but named by no category

    def slot_params(self) -> list[str]:
        return [p for per_layer in self.slots.values() for slots in per_layer for s in slots for p in s.params]


def check_groups(groups: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
    if groups is None:
        return None
    if hasattr(groups, "as_dict"):
        groups = groups.as_dict()
    if not isinstance(groups, dict) or not groups:
        raise HFTError(f"HalfFineTuning groups={groups!r} must map category names to lists of module regexes.")
    out: dict[str, list[str]] = {}
    for cat, patterns in groups.items():
        if isinstance(patterns, str) or not isinstance(patterns, (list, tuple)) or not patterns:
            raise HFTError(f"HalfFineTuning groups[{cat!r}]={patterns!r} must be a non-empty list of regexes.")
        for pat in patterns:
            try:
                re.compile(pat)
            except (re.error, TypeError) as err:
                raise HFTError(f"HalfFineTuning groups[{cat!r}] has an invalid regex {pat!r} ({err}).") from err
        out[str(cat)] = [str(p) for p in patterns]
    return out


def own_param_modules(block: nn.Module) -> list[str]:
    return [n for n, m in block.named_modules() if n and any(True for _ in m.parameters(recurse=False))]


def _match(block: nn.Module, groups: dict[str, list[str]]) -> dict[str, list[str]] | str:
    """category -> the module name (relative to the block) each regex matches, or the reason it fails."""
    names = own_param_modules(block)
    out: dict[str, list[str]] = {}
    used: set[str] = set()
    for cat, patterns in groups.items():
        out[cat] = []
        for pat in patterns:
            hits = [n for n in names if re.fullmatch(pat, n)]
            if len(hits) != 1:
                return f"{cat} regex {pat!r} matches {len(hits)} modules ({hits[:4]}), not exactly one"
            if hits[0] in used:
                return f"module {hits[0]!r} is matched by two regexes"
            used.add(hits[0])
            out[cat].append(hits[0])
    return out


def table_categories(arch: A.Architecture) -> dict[str, list[str]]:
    """category -> module paths (relative to a block) from the architecture table."""
    roles = arch.roles
    cats = {
        "attention": [roles[r] for r in ATTENTION_ROLES if r in roles],
        "ffn": [roles[r] for r in FFN_ROLES if r in roles],
        "norm": [roles[r] for r in NORM_ROLES if r in roles],
    }
    return {c: paths for c, paths in cats.items() if paths}


def _find_blocks(model: nn.Module, blocks_path: str | None) -> tuple[str, str, nn.ModuleList, dict[str, list[str]]]:
    """(family name, dotted name of the block list in ``model``, the list, table categories)."""
    names = {id(m): n for n, m in model.named_modules()}
    if blocks_path is not None:
        try:
            stack = A.get_path(model, blocks_path)
        except (AttributeError, IndexError):
            stack = None
        if not isinstance(stack, nn.ModuleList) or len(stack) == 0:
            raise HFTError(f"HalfFineTuning blocks={blocks_path!r} is not a non-empty nn.ModuleList of "
                           f"{type(model).__name__}; give the dotted path of its list of blocks.")
        return "blocks", blocks_path, stack, {}
    try:
        A.architecture_of(model)
    except A.UnsupportedArchitecture as exc:
        raise HFTError(f"HalfFineTuning cannot run on this model: {str(exc).rstrip('.')}; or pass HalfFineTuning "
                       "`blocks` (the dotted path of its block list) and `groups` (category -> module regexes)."
                       ) from None
    arch = A.require(model, "HalfFineTuning", needs=("single_stack",), error=HFTError)
    stack = A.block_stacks(model)[0]
    return arch.name, names.get(id(stack), ""), stack, table_categories(arch)


def build_layout(model: nn.Module, groups: dict[str, list[str]] | None, blocks_path: str | None = None) -> Layout:
    arch, blocks_name, blocks, categories = _find_blocks(model, blocks_path)
    if groups is not None:
        matched = _match(blocks[0], groups)
        arch = f"groups on {arch}" if blocks_path is None else "groups"
        if isinstance(matched, str):
            raise HFTError(
                f"HalfFineTuning groups do not fit {type(model).__name__}: {matched}; the modules of block "
                f"{blocks_name}.0 are {own_param_modules(blocks[0])}."
            )
    elif blocks_path is not None:
        raise HFTError(f"HalfFineTuning blocks={blocks_path!r} needs `groups` (category -> module regexes); the "
                       f"modules of block {blocks_name}.0 are {own_param_modules(blocks[0])}.")
    else:
        matched = categories
    prefix = f"{blocks_name}." if blocks_name else ""
    param_names = {id(p): n for n, p in model.named_parameters()}
    slots: dict[str, list[list[Slot]]] = {cat: [] for cat in matched}
    covered: set[str] = set()
    for i, block in enumerate(blocks):
        for cat, rel_names in matched.items():
            row = []
            for rel in rel_names:
                try:
                    module = A.get_path(block, rel)
                except (AttributeError, IndexError):
                    raise HFTError(
                        f"HalfFineTuning: block {prefix}{i} has no module {rel!r} (block 0 has); blocks must "
                        "share one layout."
                    ) from None
                ps = [(param_names[id(p)], p) for p in module.parameters(recurse=False)]
                ps = [(n, p) for n, p in ps if n not in covered]  # a tensor shared by two modules counts once
                covered.update(n for n, _ in ps)
                # the weight first: the grid shows the weight's status, the bias follows it
                ps.sort(key=lambda np_: (not np_[0].endswith("weight"), np_[0]))
                row.append(Slot(layer=i, label=rel, params=[n for n, _ in ps], numel=sum(p.numel() for _, p in ps)))
            slots[cat].append(row)
    in_blocks = {id(p) for p in blocks.parameters()}
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    if isinstance(out_emb, nn.Module):
        embedding_ids.update(id(p) for p in out_emb.parameters())
    embeddings, other, uncovered = [], [], []
    for name, p in model.named_parameters():
        if name in covered:
            continue
        if id(p) in in_blocks:
            uncovered.append(name)
        elif id(p) in embedding_ids:
            embeddings.append(name)
        else:
            other.append(name)
    return Layout(arch=arch, blocks=blocks_name, n_layers=len(blocks), columns=dict(matched), slots=slots,
                  embeddings=embeddings, other=other, uncovered=uncovered)


def short_labels(labels: list[str]) -> list[str]:
    """The shortest dotted suffix of each label that is unique among the labels."""
    out = []
    for label in labels:
        parts = label.split(".")
        for k in range(1, len(parts) + 1):
            cand = ".".join(parts[-k:])
            if sum(1 for other in labels if other == cand or other.endswith("." + cand)) == 1:
                break
        out.append(cand)
    return out
