"""Built-in variants. Importing this package registers each one's config under its name."""

from lorafx.variants.lora import LoRA, LoRAAdapter

__all__ = ["LoRA", "LoRAAdapter"]
