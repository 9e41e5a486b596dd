"""Callbacks that steer training from the side (installed as ``lightning_peft.callbacks``).

Each behaviour lives in its own file, uses only public Lightning hooks, keeps all of its state in
``state_dict()`` and agrees across DDP ranks.
"""

from lightning_peft.callbacks.greentrainer import GreenTrainer
from lightning_peft.callbacks.hft import HalfFineTuning
from lightning_peft.callbacks.token_elimination import TokenElimination

__all__: list[str] = ["GreenTrainer", "HalfFineTuning", "TokenElimination"]
