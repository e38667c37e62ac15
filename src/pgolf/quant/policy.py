"""What each tensor becomes (SPEC §5.19): a plan per tensor from its role, name and QuantConfig.

Classes, from the parameter role set where the parameter was created (pgolf.model.roles) and,
inside the `matrix` role, the record's name rule (`.mlp.` → mlp, `.attn.` → attn):

    embed   the token embedding (tied: also the output head)   embed_bits, embed_clip
    table   other lookup tables (BigramHash, value embeddings)  int8 per-row percentile, no GPTQ
    head    an untied output head                               head_bits, embed clip settings
    attn    attention matrices                                  attn_bits or matrix_bits
    mlp     MLP matrices                                        mlp_bits or matrix_bits
    matrix  other 2-D matrices                                  matrix_bits

Every float tensor with at most `keep_float_max_numel` elements is stored float16, before any
role rule (the records' order, so small control tensors are float16 too); non-float tensors are
stored as they are; large float tensors that are not 2-D role matrices are stored float16.
`quant_overrides` ("glob=spec,glob=spec", first match wins; spec fp16 | int5..int8, optionally
+gptq / -gptq, then optionally `:clip`, a clip method) beat everything, for experiments such as
INT5's fp16 `blocks.8.attn.c_k`, or TOP's int8 attention gate, per row at the row maximum, which
would otherwise be float16 for its size: `*.attn.gate_w=int8-gptq:rowmax`.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, replace

import torch

from pgolf.errors import PgolfError
from pgolf.quant.config import QuantConfig
from pgolf.quant.gptq import ClipRule, GPTQOptions
from pgolf.quant.grid import SUPPORTED_BITS

TOKEN_EMBEDDING = "tok_emb.weight"
_OVERRIDE = re.compile(r"^(fp16|int([5-8]))([+-]gptq)?(?::([a-z-]+))?$")


@dataclass(frozen=True)
class TensorPlan:
    scheme: str  # "int" | "float16" | "raw"
    qclass: str  # `quant_class`'s: embed, table, head, attn, mlp, matrix; or "float", "raw"
    bits: int = 0
    clip: ClipRule | None = None
    gptq: bool = False


def quant_class(name: str, role: str | None) -> str:
    if role == "embedding":
        # Only the token embedding doubles as the output head; the other tables have no linear
        # input, hence no Hessian, and the records store them as plain int8 rows (SPEC §9.1).
        return "embed" if name == TOKEN_EMBEDDING else "table"
    if role == "head":
        return "head"
    if ".mlp." in name:
        return "mlp"
    if ".attn." in name:
        return "attn"
    return "matrix"


def parse_overrides(text: str) -> list[tuple[str, str, int, bool | None, str | None]]:
    """`glob=spec,...` → [(glob, scheme, bits, gptq or None, clip or None)]; PgolfError names a
    bad item."""
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        pattern, _, spec = item.partition("=")
        m = _OVERRIDE.match(spec.strip())
        if not pattern or not m:
            raise PgolfError(
                f"quant.quant_overrides: cannot read {item!r}; expected glob=fp16 or "
                "glob=int5..int8 with optional +gptq/-gptq and :clip"
            )
        gptq = None if m.group(3) is None else m.group(3) == "+gptq"
        if m.group(1) == "fp16":
            out.append((pattern.strip(), "float16", 0, None, None))
        else:
            out.append((pattern.strip(), "int", int(m.group(2)), gptq, m.group(4)))
    return out


def clip_rule(cfg: QuantConfig, qclass: str) -> ClipRule:
    if qclass == "table":
        method, sigmas = "percentile", 0.0
    elif qclass in ("embed", "head"):
        method, sigmas = cfg.embed_clip, cfg.embed_clip_sigmas
    else:
        method = cfg.matrix_clip
        per_class = {"attn": cfg.attn_clip_sigmas, "mlp": cfg.mlp_clip_sigmas}.get(qclass, 0.0)
        sigmas = per_class or cfg.matrix_clip_sigmas
    try:
        return ClipRule(
            method=method,
            sigmas=sigmas,
            percentile=cfg.clip_percentile,
            per_row=cfg.clip_search_per_row,
            hsd_lambda=cfg.hsd_lambda,
            floor=cfg.scale_floor,
        )
    except ValueError as e:
        raise PgolfError(f"quant clip setting: {e}") from None


def _with_clip(rule: ClipRule, method: str) -> ClipRule:
    try:
        return replace(rule, method=method)
    except ValueError as e:
        raise PgolfError(f"quant.quant_overrides: {e}") from None


def class_bits(cfg: QuantConfig, qclass: str) -> int:
    bits = {
        "embed": cfg.embed_bits,
        "table": 8,
        "head": cfg.head_bits,
        "attn": cfg.attn_bits or cfg.matrix_bits,
        "mlp": cfg.mlp_bits or cfg.matrix_bits,
    }.get(qclass, cfg.matrix_bits)
    if bits not in SUPPORTED_BITS:
        raise PgolfError(f"quant: {qclass} bits {bits} unsupported; expected {SUPPORTED_BITS}")
    return bits


def gptq_options(cfg: QuantConfig) -> GPTQOptions:
    try:
        return GPTQOptions(
            block_size=cfg.gptq_block_size,
            damp=cfg.gptq_damp,
            order=cfg.gptq_order,
            feedback=cfg.gptq_feedback,
            refit_scales=cfg.gptq_refit_scales,
        )
    except ValueError as e:
        raise PgolfError(f"quant GPTQ setting: {e}") from None


def plan_tensors(
    state: dict[str, torch.Tensor], roles: dict[str, str], cfg: QuantConfig
) -> dict[str, TensorPlan]:
    """name → TensorPlan for every state-dict entry; `roles` maps parameter names to roles."""
    if cfg.quant_method not in ("gptq", "rtn"):
        raise PgolfError(f"quant.quant_method {cfg.quant_method!r}: expected gptq or rtn")
    overrides = parse_overrides(cfg.quant_overrides)
    plans: dict[str, TensorPlan] = {}
    for name, t in state.items():
        role = roles.get(name)
        qclass = quant_class(name, role)
        use_gptq = (
            cfg.quant_method == "gptq"
            and qclass != "table"
            and (cfg.gptq_embed if qclass in ("embed", "head") else cfg.gptq_matrix)
        )
        match = next((o for o in overrides if fnmatch.fnmatchcase(name, o[0])), None)
        if not t.is_floating_point():
            plans[name] = TensorPlan("raw", "raw")
        elif match is not None and match[1] == "float16":
            plans[name] = TensorPlan("float16", "float")
        elif match is not None and t.ndim == 2:  # an int override only means something for matrices
            gptq = use_gptq if match[3] is None else match[3]
            rule = clip_rule(cfg, qclass)
            if match[4] is not None:
                rule = _with_clip(rule, match[4])
            plans[name] = TensorPlan("int", qclass, match[2], rule, gptq)
        elif t.numel() <= cfg.keep_float_max_numel:
            plans[name] = TensorPlan("float16", "float")
        elif t.ndim == 2 and role in ("matrix", "embedding", "head"):
            bits = class_bits(cfg, qclass)
            plans[name] = TensorPlan("int", qclass, bits, clip_rule(cfg, qclass), use_gptq)
        else:
            plans[name] = TensorPlan("float16", "float")
    return plans
