"""PEFT's checkpoint layout for MoE sites (``target_parameters``, PEFT 0.21's ``lora.ParamWrapper``).

PEFT adapts a parameter by wrapping its module; several parameters of one module nest the wrappers
in the module's registration order, the first innermost. So on Mixtral/Qwen3-MoE the keys are
``...experts.base_layer.lora_A.weight`` for ``gate_up_proj`` and ``...experts.lora_A.weight`` for
``down_proj`` (with both targeted), and ``...mlp.gate.lora_A.weight`` for the router, whose rank and
alpha patterns match the parameter key ``...mlp.gate.weight``.

An expert tensor's pair is stored flat: ``lora_A [E·r, d_in]`` with expert ``e`` in rows
``e·r .. e·r + r - 1``, and ``lora_B [d_out, r·E]`` with rank ``k`` of expert ``e`` in column
``k·E + e`` (PEFT reshapes B to ``[d_out, r, E]``). lorafx stores ``[E, r, d_in]`` and ``[E, d_out, r]``.
"""

from __future__ import annotations

from torch import Tensor


def peft_paths(sites: dict[str, str]) -> dict[str, str]:
    """Site FQN -> the module path of its PEFT keys, for sites given as FQN -> kind
    (``"linear"``, ``"router"``, ``"expert"``). Expert sites of one module nest in the order given."""
    paths = {f: f for f, kind in sites.items() if kind != "expert"}
    owners: dict[str, list[str]] = {}
    for f, kind in sites.items():
        if kind == "expert":
            owners.setdefault(f.rpartition(".")[0], []).append(f)
    for owner, fqns in owners.items():
        for i, f in enumerate(fqns):
            paths[f] = owner + ".base_layer" * (len(fqns) - 1 - i)
    return paths


def pattern_key(fqn: str, kind: str) -> str:
    """The key PEFT matches ``rank_pattern``/``alpha_pattern`` against for a site."""
    return f"{fqn}.weight" if kind == "router" else fqn


def target_parameter(fqn: str, kind: str) -> str | None:
    """The site's entry in PEFT's ``target_parameters`` (None: it goes to ``target_modules``)."""
    return {"router": f"{fqn}.weight", "expert": fqn}.get(kind)


def to_peft_pair(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """lorafx's ``A [E, r, d_in]``, ``B [E, d_out, r]`` -> PEFT's ``[E·r, d_in]``, ``[d_out, r·E]``."""
    E, r, d_in = A.shape
    return A.reshape(E * r, d_in), B.permute(1, 2, 0).reshape(B.shape[1], r * E)


def from_peft_A(A: Tensor, num_experts: int) -> Tensor:
    """PEFT's ``lora_A [E·r, d_in]`` -> ``[E, r, d_in]``."""
    return A.reshape(num_experts, -1, A.shape[-1])


def from_peft_B(B: Tensor, num_experts: int) -> Tensor:
    """PEFT's ``lora_B [d_out, r·E]`` -> ``[E, d_out, r]``."""
    return B.reshape(B.shape[0], -1, num_experts).permute(2, 0, 1).contiguous()
