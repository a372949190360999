"""Field checks shared by the variants' configs; each raises ``ValueError`` naming the variant and field."""

from __future__ import annotations

INITS = ("default", "gaussian", "random")


def check_int(cfg, field: str, minimum: int = 1) -> None:
    """``cfg.field`` is an int (not a bool) of at least ``minimum`` (1: positive, 0: non-negative)."""
    value = getattr(cfg, field)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = {1: "a positive int", 0: "a non-negative int"}.get(minimum, f"an int >= {minimum}")
        raise ValueError(f"{cfg.name}: {field} must be {kind}, got {value!r}")


def check_interval(cfg, field: str, low: float, high: float, *, closed: str = "[)") -> None:
    """``cfg.field`` lies in the interval from ``low`` to ``high``; ``closed`` gives its two brackets."""
    value = getattr(cfg, field)
    above = value >= low if closed[0] == "[" else value > low
    below = value <= high if closed[1] == "]" else value < high
    if not (above and below):
        raise ValueError(f"{cfg.name}: {field} must be in {closed[0]}{low:g}, {high:g}{closed[1]}, got {value!r}")


def check_at_least(cfg, field: str, low: float) -> None:
    """``cfg.field >= low`` (NaN fails)."""
    value = getattr(cfg, field)
    if not value >= low:
        raise ValueError(f"{cfg.name}: {field} must be >= {low:g}, got {value!r}")


def check_rank_alpha_dropout(cfg) -> None:
    """The LoRA family's common fields: rank ``r``, scale numerator ``alpha``, input ``dropout``."""
    check_int(cfg, "r")
    if not isinstance(cfg.alpha, (int, float)) or cfg.alpha <= 0:
        raise ValueError(f"{cfg.name}: alpha must be a positive number, got {cfg.alpha!r}")
    check_interval(cfg, "dropout", 0, 1)


def check_init(cfg, allowed: tuple[str, ...] = INITS) -> None:
    """``init`` is one of ``allowed``; ``ValueError`` naming the variant and the choices otherwise."""
    if cfg.init not in allowed:
        choices = ", ".join(map(repr, allowed[:-1])) + f" or {allowed[-1]!r}"
        raise ValueError(f"{cfg.name}: init must be {choices}, got {cfg.init!r}")
