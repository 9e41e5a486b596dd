"""PEFT heads: one file per method, all on the :class:`~lightning_peft.heads.base.Head` contract."""

from lightning_peft.heads.base import Head, HeadError, head_from_config
from lightning_peft.heads.bottleneck import BottleneckAdapter
from lightning_peft.heads.full import FullFineTune
from lightning_peft.heads.goft import GOFT
from lightning_peft.heads.lora import LoRA
from lightning_peft.heads.peft_head import PeftHead
from lightning_peft.heads.prompt import PromptHead, PromptModel
from lightning_peft.heads.propulsion import Propulsion
from lightning_peft.heads.sharelora import ShareLoRA
from lightning_peft.heads.sparse_adapter import SparseAdapter

__all__ = ["FullFineTune", "Head", "HeadError", "LoRA", "PeftHead", "PromptHead", "PromptModel", "head_from_config",
           "Propulsion", "ShareLoRA", "BottleneckAdapter", "SparseAdapter", "GOFT"]
