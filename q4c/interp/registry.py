"""The interpreter's op registry: a plain dict `(domain, op_type) -> {since_version: fn}`."""

from __future__ import annotations

from collections.abc import Callable

from q4c.errors import UnsupportedOpError

OpFn = Callable[..., tuple]

# "" and "ai.onnx" name the same default domain in ONNX.
_DOMAIN_ALIASES = {"ai.onnx": ""}

REGISTRY: dict[tuple[str, str], dict[int, OpFn]] = {}


def normalize_domain(domain: str) -> str:
    """Map ONNX's alternative spellings of a domain to the one the registry uses."""
    return _DOMAIN_ALIASES.get(domain, domain)


def op(op_type: str, since: int, *, domain: str = "") -> Callable[[OpFn], OpFn]:
    """Register the decorated function for `op_type` from opset version `since` of `domain`.

    Stack several decorators when one function serves several versions; registering the same
    (domain, op_type, since) twice is refused.
    """
    key = (normalize_domain(domain), op_type)

    def register(fn: OpFn) -> OpFn:
        versions = REGISTRY.setdefault(key, {})
        if since in versions:
            raise ValueError(
                f"{key[0] or 'ai.onnx'}::{op_type} since {since} is already registered "
                f"by {versions[since].__module__}.{versions[since].__name__}"
            )
        versions[since] = fn
        return fn

    return register


def lookup(domain: str, op_type: str, opset: int | None) -> OpFn:
    """The function for `op_type` with the highest registered since-version <= `opset`."""
    domain = normalize_domain(domain)
    versions = REGISTRY.get((domain, op_type), {})
    if opset is None:
        raise UnsupportedOpError(
            f"{domain or 'ai.onnx'}::{op_type}: the model imports no opset for domain "
            f"'{domain or 'ai.onnx'}'; add it to the model's opset_import"
        )
    usable = [v for v in versions if v <= opset]
    if not usable:
        known = ", ".join(str(v) for v in sorted(versions)) or "none"
        raise UnsupportedOpError(
            f"{domain or 'ai.onnx'}::{op_type} at opset {opset} is not supported by q4c.interp "
            f"(known since-versions: {known})"
        )
    return versions[max(usable)]


def registered_ops() -> dict[tuple[str, str], tuple[int, ...]]:
    """Every registered (domain, op_type) with its since-versions, sorted."""
    return {key: tuple(sorted(versions)) for key, versions in sorted(REGISTRY.items())}
