"""PEFT heads: one file per method, all on the :class:`~lightning_peft.heads.base.Head` contract."""

from lightning_peft.heads.base import Head, HeadError, head_from_config
from lightning_peft.heads.full import FullFineTune
from lightning_peft.heads.goft import GOFT
from lightning_peft.heads.lora import LoRA
from lightning_peft.heads.peft_head import PeftHead
from lightning_peft.heads.prompt import PromptHead, PromptModel

__all__ = ["FullFineTune", "Head", "HeadError", "LoRA", "PeftHead", "PromptHead", "PromptModel", "head_from_config"]
__all__ += ["GOFT"]
