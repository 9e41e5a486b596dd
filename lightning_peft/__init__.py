"""lightning-peft: PyTorch Lightning components for parameter-efficient fine-tuning."""

from lightning_peft.backbones import load_backbone, load_tokenizer
from lightning_peft.modules import CausalLM, PeftModule, SequenceClassifier

__all__ = ["CausalLM", "PeftModule", "SequenceClassifier", "load_backbone", "load_tokenizer"]
__version__ = "0.1.0"
