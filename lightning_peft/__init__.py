"""lightning-peft: PyTorch Lightning components for parameter-efficient fine-tuning."""

from lightning_peft.backbones import load_backbone, load_tokenizer
from lightning_peft.generation import generate_answers
from lightning_peft.metrics import GSM8KExactMatch, extract_gsm8k_answer, gsm8k_exact_match
from lightning_peft.modules import CausalLM, PeftModule, SequenceClassifier

__all__ = [
    "CausalLM",
    "GSM8KExactMatch",
    "PeftModule",
    "SequenceClassifier",
    "extract_gsm8k_answer",
    "generate_answers",
    "gsm8k_exact_match",
    "load_backbone",
    "load_tokenizer",
]
__version__ = "0.1.0"
