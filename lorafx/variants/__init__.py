"""Built-in variants. Importing this package registers each one's config under its name."""

from lorafx.variants.capaboost import CapaBoost, CapaBoostAdapter
from lorafx.variants.celora import CELoRA, CELoRAAdapter
from lorafx.variants.droplora import DropLoRA, DropLoRAAdapter
from lorafx.variants.lora import LoRA, LoRAAdapter
from lorafx.variants.mor import MoR, MoRAdapter
from lorafx.variants.unilora import UniLoRA, UniLoRAAdapter, UniLoRAVector

__all__ = [
    "CELoRA",
    "CELoRAAdapter",
    "CapaBoost",
    "CapaBoostAdapter",
    "DropLoRA",
    "DropLoRAAdapter",
    "LoRA",
    "LoRAAdapter",
    "MoR",
    "MoRAdapter",
    "UniLoRA",
    "UniLoRAAdapter",
    "UniLoRAVector",
]
