"""Which physical layer does what, and in which order layers run (SPEC §5.3, §5.4, §5.11, §5.28).

Pure functions of a ModelConfig, resolved once when the model is built. Layer indices may be
negative (counted from the last layer), so a preset written for 11 layers keeps its meaning when
shrunk; an index that does not exist at the chosen depth raises instead of silently dropping a
technique.
"""

from __future__ import annotations

from dataclasses import dataclass

from pgolf.errors import PgolfError
from pgolf.model.config import ModelConfig


def resolve_layer(index: int, num_layers: int, what: str) -> int:
    """A layer index in [0, num_layers), accepting Python-style negatives."""
    resolved = index + num_layers if index < 0 else index
    if not 0 <= resolved < num_layers:
        raise PgolfError(
            f"model.{what}={index} names no layer of a {num_layers}-layer model "
            f"(valid: {-num_layers}..{num_layers - 1})"
        )
    return resolved


def parse_layer_list(text: str, num_layers: int, what: str) -> tuple[int, ...]:
    """Comma-separated layer indices ("9,10" or "-2,-1") → sorted distinct physical indices."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    try:
        indices = [int(s) for s in items]
    except ValueError:
        raise PgolfError(f"model.{what}={text!r}: expected comma-separated integers") from None
    return tuple(sorted({resolve_layer(i, num_layers, what) for i in indices}))


def xsa_layers(last_n: int, num_layers: int) -> tuple[int, ...]:
    """The last `last_n` layers (a count from the end, so any N ≥ L means all); -1 = all."""
    if last_n < -1:
        raise PgolfError(f"model.xsa_last_n={last_n}: use a count ≥ 0, or -1 for every layer")
    count = num_layers if last_n == -1 else min(last_n, num_layers)
    return tuple(range(num_layers - count, num_layers))


def looped_order(num_layers: int, start: int, end: int, num_loops: int) -> tuple[int, ...]:
    """Layers start..end (inclusive) run 1 + num_loops times in a row, with shared weights.

    11 layers, 4..5, 2 loops: (0, 1, 2, 3, 4, 5, 4, 5, 4, 5, 6, 7, 8, 9, 10) (S1394/S1413).
    """
    segment = list(range(start, end + 1))
    return (
        tuple(range(start)) + tuple(segment * (1 + num_loops)) + tuple(range(end + 1, num_layers))
    )


def split_encoder_decoder(order: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """First half (rounded down) is the U-Net encoder, the rest the decoder (SPEC §4.1, §5.28)."""
    half = len(order) // 2
    return order[:half], order[half:]


def _check_lanes(
    cfg: ModelConfig,
    parallel: tuple[int, ...],
    orders: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...],
) -> None:
    """TOP's lanes split the stream once and never merge it back before the head, so in every
    layer order the parallel layers must be a tail of the decoder (TOP: 8..10 of 11, after the
    looped 3..5); anything else would need a merge TOP does not define."""
    where = f"model.parallel_lanes with model.parallel_residual_start={cfg.parallel_residual_start}"
    if not parallel:
        raise PgolfError(f"{where}: no parallel layer, so no lanes")
    for encoder, decoder in orders:
        in_lanes = [i in parallel for i in decoder]
        tail = in_lanes[in_lanes.index(True) :] if True in in_lanes else []
        if set(encoder) & set(parallel) or not tail or not all(tail):
            raise PgolfError(
                f"{where}: the parallel layers must run last, in the decoder only, "
                f"but the layer order is encoder {list(encoder)}, decoder {list(decoder)}"
            )


@dataclass(frozen=True)
class Layout:
    num_layers: int
    xsa: tuple[int, ...]  # physical layers with XSA
    ve: tuple[int, ...]  # physical layers that add the value embedding
    parallel: tuple[int, ...]  # physical layers with parallel residuals
    plain: tuple[tuple[int, ...], tuple[int, ...]]  # (encoder, decoder) without recurrence
    looped: tuple[tuple[int, ...], tuple[int, ...]]  # (encoder, decoder) with recurrence
    num_skip_weights: int

    @property
    def has_recurrence(self) -> bool:
        return self.looped != self.plain


def resolve_layout(cfg: ModelConfig) -> Layout:
    """Every layer selection of `cfg` resolved against its depth; PgolfError if impossible."""
    n = cfg.num_layers
    if n < 1:
        raise PgolfError("model.num_layers must be ≥ 1")
    plain = split_encoder_decoder(tuple(range(n)))
    looped = plain
    if cfg.num_loops < 0:
        raise PgolfError(f"model.num_loops={cfg.num_loops} must be ≥ 0")
    if cfg.num_loops > 0:
        start = resolve_layer(cfg.loop_start, n, "loop_start")
        end = resolve_layer(cfg.loop_end, n, "loop_end")
        if end < start:
            raise PgolfError(
                f"model.loop_end={cfg.loop_end} (layer {end}) comes before "
                f"model.loop_start={cfg.loop_start} (layer {start})"
            )
        looped = split_encoder_decoder(looped_order(n, start, end, cfg.num_loops))
    parallel: tuple[int, ...] = ()
    if cfg.parallel_residual_start < n:
        first = resolve_layer(cfg.parallel_residual_start, n, "parallel_residual_start")
        parallel = tuple(range(first, n))
    if cfg.parallel_lanes:
        _check_lanes(cfg, parallel, (plain, looped))
    ve = parse_layer_list(cfg.ve_layers, n, "ve_layers") if cfg.ve_enabled else ()
    if cfg.ve_enabled and not ve:
        raise PgolfError("model.ve_enabled is on but model.ve_layers lists no layer")
    # Skip weights are sized for the looped layout (S1394: 7 for 11 layers looped 4..5 ×2); the
    # plain layout uses the first min(enc, dec) of them.
    return Layout(
        num_layers=n,
        xsa=xsa_layers(cfg.xsa_last_n, n),
        ve=ve,
        parallel=parallel,
        plain=plain,
        looped=looped,
        num_skip_weights=min(len(looped[0]), len(looped[1])),
    )
