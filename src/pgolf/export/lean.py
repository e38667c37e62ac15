"""The lean `train_gpt.py`: `lean_train_gpt.py` specialised to one run's config (SPEC §1.2).

The bundle (`pgolf.export.bundle`) ships pgolf's own modules and costs 60–80 KB; a record's code
costs 12–20 KB. The lean script is a second, record-style implementation of the pipeline the
simpler configs run, kept honest by tests that reproduce a `pgolf run` with it bit for bit.
Specialising it folds every setting into the code as a literal, drops the `if` branches that
become constant and the top-level definitions nothing calls any more, so a baseline script
carries no code for the techniques it does not use.

`uncovered(config)` lists the settings the template does not implement; the exporter ships the
lean script only when that list is empty, the bundle otherwise.
"""

from __future__ import annotations

import ast
from pathlib import Path

from pgolf import rules, rundir
from pgolf.artifact.codecs import SECTION_CODECS
from pgolf.config import RunConfig

TEMPLATE = Path(__file__).with_name("lean_train_gpt.py")
# Constants the script shares with pgolf, folded in from their one definition like settings.
CONSTANTS = {
    "rules.BYTES_CAP": rules.BYTES_CAP,
    "rundir.ARTIFACT": rundir.ARTIFACT,
    "rundir.REPORT": rundir.REPORT,
    "rundir.TRAIN_LOG": rundir.TRAIN_LOG,
}

# Settings that never change a number the script produces: where the data is, logging and
# checkpointing cadence, the eval-time cap's warning (the script only reports its eval time).
IGNORED = {
    "preset",
    "illegal",
    "data.path",
    "data.tokenizer",
    "data.train_glob",
    "data.val_glob",
    "data.allow_tokenizer_mismatch",
    "train.val_loss_every",
    "train.checkpoint_every",
    "train.checkpoint_every_seconds",
    "eval.eval_time_cap_s",
    "eval.eval_time_cap_action",
}
# Sections of settings that only matter when a switch turns them on: (switch test, prefixes).
SWITCHED = (
    (lambda c: c["quant.codec"] == "int8-zlib", ("quant.",)),
    (lambda c: not c["eval.ttt_enabled"], ("eval.ttt_",)),
    (lambda c: not c["eval.prequant_ttt_enabled"], ("eval.prequant_ttt_",)),
    (lambda c: c["eval.eval_mode"] != "sliding", ("eval.eval_stride", "eval.eval_batch_windows")),
)
# Settings the template implements for some values only (whether it reads them or not).
ALLOWED = {
    "quant.codec": lambda v: v in ("int8-zlib", "mixed"),
    "eval.eval_mode": lambda v: v in ("nonoverlapping", "sliding"),
    "model.logit_softcap": lambda v: v > 0,
    "model.smear_gate": lambda v: v in ("off", "v1"),
    # the mixed quantizer as S1019 runs it: GPTQ with the clip search on int matrices, on
    # self-generated calibration, percentile int8 embeddings, any section codec, ±1 pruning
    "quant.quant_method": lambda v: v == "gptq",
    "quant.gptq_matrix": lambda v: v is True,
    "quant.gptq_embed": lambda v: v is False,
    "quant.matrix_clip": lambda v: v == "search-gptq",
    "quant.embed_clip": lambda v: v == "percentile",
    "quant.gptq_order": lambda v: v == "desc",
    "quant.gptq_feedback": lambda v: v == "cholesky",
    "quant.calib_source": lambda v: v == "selfgen",
    "quant.selfgen_context": lambda v: v == 0,
    "quant.compressor": lambda v: v in SECTION_CODECS or v == "auto",
    "quant.fit_prune": lambda v: v in ("pm1", "none"),
}


def flatten(config: dict) -> dict:
    """{"model": {"num_layers": 9}, "preset": "x"} → {"model.num_layers": 9, "preset": "x"}."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{name}": v for name, v in value.items()})
        else:
            flat[key] = value
    return flat


def _template() -> ast.Module:
    return ast.parse(TEMPLATE.read_text(encoding="utf-8"))


def read_keys(tree: ast.AST) -> set[str]:
    """The settings the template reads: every `C["section.name"]`."""
    return {
        node.slice.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Subscript)
        and isinstance(node.value, ast.Name)
        and node.value.id == "C"
        and isinstance(node.slice, ast.Constant)
    }


def uncovered(config: dict) -> list[str]:
    """Why the template cannot reproduce `config` (`RunConfig.to_dict`): one line per setting."""
    flat, default = flatten(config), flatten(RunConfig().to_dict())
    read = read_keys(_template())
    skipped = set(IGNORED)
    for off, prefixes in SWITCHED:
        if off(flat):
            skipped |= {k for k in flat if k.startswith(prefixes)}
    reasons = []
    for key, value in flat.items():
        if key in skipped:
            continue
        # what the template does not read, it implements at the default only
        supported = ALLOWED[key](value) if key in ALLOWED else key in read or value == default[key]
        if not supported:
            reasons.append(f"{key}={value!r}")
    return reasons


def _truth(node: ast.expr) -> bool | None:
    """The truth of a folded test, when the literals alone decide it."""
    if isinstance(node, ast.Constant):
        return bool(node.value)
    if isinstance(node, ast.BoolOp):
        known = [_truth(v) for v in node.values]
        decisive = isinstance(node.op, ast.Or)  # `or`: one True decides; `and`: one False
        if decisive in known:
            return decisive
        if all(k is not None for k in known):
            return not decisive
    return None


class _Fold(ast.NodeTransformer):
    """Settings → literals, then constant sub-expressions and decided branches folded away."""

    def __init__(self, values: dict):
        self.values = values

    def visit_Subscript(self, node: ast.Subscript) -> ast.expr:
        self.generic_visit(node)
        if isinstance(node.value, ast.Name) and node.value.id == "C":
            return ast.copy_location(ast.Constant(self.values[node.slice.value]), node)
        return node

    def _constant(self, node: ast.expr) -> ast.expr:
        self.generic_visit(node)
        if all(isinstance(n, ast.Constant) for n in _operands(node)):
            value = eval(compile(ast.Expression(node), "<fold>", "eval"), {"__builtins__": {}})
            return ast.copy_location(ast.Constant(value), node)
        return node

    visit_BinOp = visit_UnaryOp = visit_Compare = _constant

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.expr:
        node = self._constant(node)
        if isinstance(node, ast.BoolOp):
            # `False or x` is x, as is `True and x`; a last operand keeps its value either way
            neutral = isinstance(node.op, ast.And)
            last = node.values[-1]
            node.values = [
                v
                for v in node.values[:-1]
                if not (isinstance(v, ast.Constant) and bool(v.value) is neutral)
            ] + [last]
            if len(node.values) == 1:
                return last
        return node

    def visit_Call(self, node: ast.Call) -> ast.expr:
        self.generic_visit(node)
        # on("off") / on("on") are decided without the device; on("cuda") is not
        if (
            isinstance(node.func, ast.Name)
            and node.func.id == "on"
            and isinstance(node.args[0], ast.Constant)
            and node.args[0].value in ("on", "off")
        ):
            return ast.copy_location(ast.Constant(node.args[0].value == "on"), node)
        return node

    def visit_IfExp(self, node: ast.IfExp) -> ast.expr:
        self.generic_visit(node)
        truth = _truth(node.test)
        return node if truth is None else (node.body if truth else node.orelse)

    def visit_Assert(self, node: ast.Assert):
        self.generic_visit(node)
        return None if _truth(node.test) is True else node  # an assert that cannot fail goes

    def visit_If(self, node: ast.If):
        self.generic_visit(node)
        truth = _truth(node.test)
        if truth is None:
            node.body = node.body or [ast.Pass()]
            return node
        return node.body if truth else node.orelse


def _operands(node: ast.expr) -> list[ast.expr]:
    if isinstance(node, ast.BinOp):
        return [node.left, node.right]
    if isinstance(node, ast.UnaryOp):
        return [node.operand]
    if isinstance(node, ast.Compare):
        return [node.left, *node.comparators]
    return list(node.values)  # BoolOp


def _drop_unused(tree: ast.Module) -> None:
    """Remove top-level functions and classes no remaining code names, until none is left."""
    while True:
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        used |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        keep = [
            s
            for s in tree.body
            if not isinstance(s, (ast.FunctionDef, ast.ClassDef)) or s.name in used
        ]
        if len(keep) == len(tree.body):
            return
        tree.body = keep


def lean_source(config: dict) -> str:
    """The template specialised to `config`: readable (docstrings and layout of ast.unparse)."""
    reasons = uncovered(config)
    if reasons:
        raise ValueError("the lean script does not implement " + ", ".join(reasons))
    flat = {**flatten(config), **CONSTANTS}
    tree = _template()
    # `C = {}` goes; every C["key"] becomes its literal
    tree.body = [
        s
        for s in tree.body
        if not (isinstance(s, ast.Assign) and getattr(s.targets[0], "id", None) == "C")
    ]
    tree = _Fold(flat).visit(tree)
    _drop_unused(tree)
    return ast.unparse(ast.fix_missing_locations(tree)) + "\n"
