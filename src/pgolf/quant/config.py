"""The quantizer's settings, the config's `quant` section: how the quantize stage turns the
trained weights into the compressed artifact.

`codec` picks the pipeline: "int8-zlib" is the official baseline (SPEC §4.8) and ignores
every other field; "mixed" is pgolf.quant (SPEC §5.19–5.25): per-role bit widths and clips, GPTQ
with calibration Hessians, fit-to-budget pruning and per-section compression. Fields that an
upstream script reads from the environment carry its name.
"""

from __future__ import annotations

from dataclasses import dataclass

from pgolf.config_fields import env_field


@dataclass
class QuantConfig:
    codec: str = "int8-zlib"  # "int8-zlib" (official, SPEC §4.8) | "mixed" (pgolf.quant)
    # -- what each role becomes (SPEC §5.19); attn/mlp 0 = inherit the matrix setting --
    quant_method: str = env_field("QUANT_METHOD", "gptq")  # gptq | rtn
    matrix_bits: int = env_field("MATRIX_BITS", 6)  # 5..8; int6 = ±31
    attn_bits: int = 0
    mlp_bits: int = 0
    embed_bits: int = env_field("EMBED_BITS", 8)  # the tied embedding (also the output head)
    head_bits: int = 8  # an untied output head
    keep_float_max_numel: int = 65536  # tensors this small are stored float16
    # comma-separated `glob=spec`, spec one of fp16 | int5..int8 [+gptq|-gptq] [:clip], first
    # match wins; TOP's int8 gate: "*.attn.gate_w=int8-gptq:rowmax"
    quant_overrides: str = ""
    # -- clipping (SPEC §5.20, §5.22): percentile | search | search-gptq | sdclip | hsdclip | rowmax
    matrix_clip: str = "sdclip"
    embed_clip: str = "sdclip"
    matrix_clip_sigmas: float = env_field("MATRIX_CLIP_SIGMAS", 12.85)
    attn_clip_sigmas: float = env_field("ATTN_CLIP_SIGMAS", 0.0)
    mlp_clip_sigmas: float = env_field("MLP_CLIP_SIGMAS", 0.0)
    embed_clip_sigmas: float = env_field("EMBED_CLIP_SIGMAS", 20.0)
    clip_percentile: float = 0.9999984  # for `percentile`
    clip_search_per_row: bool = False  # `search`: S414 picks per matrix, P578/P1004 per row
    hsd_lambda: float = 0.175  # Hessian-aware SDClip strength (HSD)
    # per-row scales ≥ 1/qmax (int6 1/31, int8 1/127) as every record up to S1060 and the seeds do;
    # off = no floor (S1394+), so a row with max |w| ≈ 0.1 keeps its own fine grid
    scale_floor: bool = False
    # -- GPTQ (SPEC §5.21, §9.6) --
    gptq_matrix: bool = True
    gptq_embed: bool = True
    gptq_damp: float = 0.01  # fraction of mean diag(H)
    gptq_block_size: int = 128
    gptq_order: str = "desc"  # desc (act-order) | natural | asc
    gptq_feedback: str = "cholesky"  # cholesky (exact) | raw (P610/P578/P1004's H^-1 rows)
    gptq_refit_scales: bool = False  # P610's per-row least-squares scale refit
    prune_pct: float = env_field("PRUNE_PCT", 0.0)  # pre-quant magnitude pruning, % per matrix
    # -- LQER (SPEC §5.19, §5.31): rank-r SVD of the quantisation error W − deq(Q) on the top-k
    # matrices by ‖W − deq(Q)‖_F, stored as quantised factors; TOP: rank 4, top 3, asymmetric --
    lqer: bool = env_field("LQER_ENABLED", False)
    lqer_rank: int = env_field("LQER_RANK", 4)
    lqer_top_k: int = env_field("LQER_TOP_K", 3)
    # asymmetric: A int2 [-2, 1] one scale per matrix, B int4 [-8, 7] per group of lqer_asym_group
    # entries; symmetric (or when B's size is not a multiple of the group): both ±(2^(b-1) - 1)
    # per row with b = lqer_factor_bits
    lqer_asymmetric: bool = env_field("LQER_ASYM_ENABLED", True)
    lqer_asym_group: int = env_field("LQER_ASYM_GROUP", 64)
    lqer_factor_bits: int = env_field("LQER_FACTOR_BITS", 4)
    # -- calibration (SPEC §1.3, §5.21, §5.23); never validation data --
    calib_source: str = "train"  # train | selfgen
    calib_batches: int = env_field("GPTQ_CALIBRATION_BATCHES", 64)
    calib_batch_tokens: int = 0  # 0 = train.train_batch_tokens
    calib_all_reduce: bool = False  # sum Hessians over ranks (the records keep rank 0's)
    selfgen_seqs: int = 64
    selfgen_len: int = 0  # tokens per sequence; 0 = train.train_seq_len, as S1019 does
    selfgen_temperature: float = 0.8
    selfgen_batch: int = 8
    selfgen_context: int = 0  # 0 = the whole prefix (a KV cache where the model has one)
    # -- packing and the byte budget (SPEC §1.2, §5.24, §5.25) --
    compressor: str = env_field("COMPRESSOR", "auto")  # auto | rans | zstd | lzma | brotli | ...
    target_bytes: int = 0  # model-byte target; 0 = 16,000,000 - code bytes (decimal)
    # The code bytes that target leaves room for: a record preset declares its own script's size
    # (what would ship); 0 = the train_gpt.py `pgolf export` ships (report.json's bytes_code).
    code_bytes: int = 0
    fit_prune: str = "pm1"  # pm1 (±1 entries, Hessian-weighted) | magnitude | none
