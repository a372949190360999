"""lorafx: LoRA-family adapters as fx graph rewrites.

``import lorafx`` stays light: it imports torch only (no triton, onnx or transformers).
"""

from lorafx.adapter import Adapter, SiteAdapters
from lorafx.adapter_files import load_adapter, save_adapter
from lorafx.apply import apply
from lorafx.canonical import Lowered
from lorafx.compiler import compile, compile_check, use_kernels  # lorafx kernels/compile (issue 4)
from lorafx.config import AdapterConfig, register_variant, variant_names
from lorafx.errors import AdapterFileError, ExportError, LorafxError, NotMergeableError, SpecError, TraceError
from lorafx.merge import is_merged, merge, merge_dequantized, merge_requantized, unmerge
from lorafx.peft_interop import from_peft, to_peft
from lorafx.report import Report, build_report
from lorafx.serving import using_adapter
from lorafx.spec import Spec
from lorafx.state import (
    active_adapter,
    adapter_names,
    delete_adapter,
    iter_sites,
    set_adapter,
    set_scale,
    step,
)
from lorafx.training import attach_step
from lorafx.unload import merge_and_unload, print_trainable_parameters, trainable_parameters, unload
from lorafx.variants import CapaBoost, CELoRA, DropLoRA, LoRA, MoR, UniLoRA
from lorafx.verify import verify_merge
from lorafx.weighted import add_weighted_adapter
from lorafx.weights import untie

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterConfig",
    "AdapterFileError",
    "CELoRA",
    "CapaBoost",
    "DropLoRA",
    "ExportError",
    "LoRA",
    "LorafxError",
    "Lowered",
    "MoR",
    "NotMergeableError",
    "Report",
    "SiteAdapters",
    "Spec",
    "SpecError",
    "TraceError",
    "UniLoRA",
    "active_adapter",
    "adapter_names",
    "add_weighted_adapter",
    "apply",
    "attach_step",
    "build_report",
    "compile",
    "compile_check",
    "delete_adapter",
    "from_peft",
    "is_merged",
    "iter_sites",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "merge_dequantized",
    "merge_requantized",
    "print_trainable_parameters",
    "register_variant",
    "save_adapter",
    "set_adapter",
    "set_scale",
    "step",
    "to_peft",
    "trainable_parameters",
    "unload",
    "unmerge",
    "untie",
    "use_kernels",
    "using_adapter",
    "variant_names",
    "verify_merge",
]
