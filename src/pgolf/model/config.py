"""Model settings: every architecture technique is a switch here, off by default (SPEC §4, §5).

With every switch at its default the model is the official baseline, parameter for parameter and
bit for bit. Layer selections accept negative indices counted from the last layer (-1 = the last),
so a preset shrunk with NUM_LAYERS keeps its meaning; an index that does not exist at the chosen
depth is an error, never silently dropped. Fields the record scripts read from the environment
carry that name.
"""

from __future__ import annotations

from dataclasses import dataclass

from pgolf.config_fields import env_field

# `parallel_residual_start` at or beyond the last layer means no parallel layers, as upstream
# (S1493's sweep uses 11 = off); this default is beyond any depth this challenge can afford.
PARALLEL_OFF = 1_000_000


@dataclass
class ModelConfig:
    # -- shape (SPEC §4.1, §5.2) --
    vocab_size: int = env_field("VOCAB_SIZE", 1024)
    num_layers: int = env_field("NUM_LAYERS", 9)
    model_dim: int = env_field("MODEL_DIM", 512)
    num_heads: int = env_field("NUM_HEADS", 8)
    num_kv_heads: int = env_field("NUM_KV_HEADS", 4)  # = num_heads: full MHA
    mlp_mult: float = env_field("MLP_MULT", 2.0)  # hidden = int(mlp_mult · model_dim)
    tie_embeddings: bool = env_field("TIE_EMBEDDINGS", True)
    rope_base: float = env_field("ROPE_BASE", 10000.0)
    logit_softcap: float = env_field("LOGIT_SOFTCAP", 30.0)  # §5.15; <= 0 = off
    # TOP's training loss: soft cap and cross-entropy in one fp32 pass over the raw logits, never
    # storing the capped ones (`pgolf.model.loss`); evaluation keeps the plain path, as TOP does.
    fused_softcap_ce: bool = env_field("FUSED_CE_ENABLED", False)
    qk_gain_init: float = env_field("QK_GAIN_INIT", 1.5)  # §5.14
    tied_embed_init_std: float = env_field("TIED_EMBED_INIT_STD", 0.005)

    # -- MLP activation (§5.13): 0 = relu² (baseline); 0.5 = LeakyReLU(0.5)² (S549 onward) --
    mlp_leaky_slope: float = 0.0

    # -- attention --
    # XSA (§5.4) on the last N layers: 0 = off, -1 = every layer at any depth.
    xsa_last_n: int = env_field("XSA_LAST_N", 0)
    # Partial RoPE (§5.9): rotate the first R dims of each head; 0 = all of them.
    rope_dims: int = env_field("ROPE_DIMS", 0)
    # Nominal RoPE length T0: longer sequences use the NTK base; 0 = never rescale. The sp1024
    # stacks hard-wire 1024 while training at 2048 (rescale always on); S1394+ use 2048.
    # Env name: S1394's Hyperparameters (not in SPEC).
    rope_train_seq_len: int = env_field("ROPE_TRAIN_SEQ_LEN", 0)
    ln_scale: bool = env_field("LN_SCALE", False)  # §5.10: norm outputs · 1/√(i+1)
    # Value-residual learning as P639 (§9.1): layers ≥ 1 blend layer 0's values in.
    value_residual: bool = env_field("VRL", False)
    # Sparse attention output gate (§5.31): per head σ(0.5·W·x[:window]) scales the head output.
    attn_out_gate: bool = False
    attn_out_gate_window: int = 12
    # Document-masked ("VarLen") attention (§5.31): a query sees only keys of its own document,
    # each BOS (`bos_id`) opening a new one. Attention only: SmearGate v1 and BigramHash still
    # mix a document's last token into the next one's BOS (use SmearGate v2 with it, as TOP).
    doc_masked_attention: bool = False

    # -- embeddings --
    # BigramHash (§5.8): K buckets × D dims; 0 buckets = off.
    bigram_vocab_size: int = env_field("BIGRAM_VOCAB_SIZE", 0)
    bigram_dim: int = env_field("BIGRAM_DIM", 128)
    bigram_trigram: bool = False  # S1019's optional extra XOR with 51497·tok[t−2] (off there)
    # SmearGate (§5.7): "off" | "v1" (per-channel, mixes across documents) | "v2" (BOS-masked).
    smear_gate: str = "off"
    smear_window: int = 12  # v2: the gate reads the first `smear_window` channels
    bos_id: int = 1  # SentencePiece BOS (SPEC §2.2); v2 never smears into it
    # Value embeddings (§5.11): one shared V×ve_dim table added to V on the listed layers.
    ve_enabled: bool = env_field("VE_ENABLED", False)
    ve_dim: int = env_field("VE_DIM", 128)
    ve_layers: str = env_field("VE_LAYERS", "-2,-1")  # upstream "9,10" of 11

    # -- depth (§5.3, §5.28) --
    # Env names of the three below: S1394's Hyperparameters / S1493's run command (not in SPEC).
    skip_gates: bool = env_field("SKIP_GATES_ENABLED", False)
    # Depth recurrence: layers loop_start..loop_end (inclusive) run num_loops extra times.
    num_loops: int = env_field("NUM_LOOPS", 0)
    loop_start: int = env_field("LOOP_START", 4)
    loop_end: int = env_field("LOOP_END", 5)
    # Fraction of training after which the trainer turns looping on (GPT.set_recurrence).
    enable_looping_at: float = env_field("ENABLE_LOOPING_AT", 0.5)
    # GPT-J parallel residuals from this physical layer on; see PARALLEL_OFF.
    parallel_residual_start: int = env_field("PARALLEL_RESIDUAL_START", PARALLEL_OFF)
    # TOP's two-lane form of the same layers instead (§5.28): attention reads lane 0 (re-mixed
    # with x0), the MLP reads lane 1, each lane keeps λ_resid of itself and takes learned shares
    # of both outputs; only decoder layers, after every sequential one. The head reads the lanes'
    # mean, or one lane ("attn" = lane 0, "mlp" = lane 1) as PARALLEL_FINAL_LANE says.
    parallel_lanes: bool = False
    parallel_final_lane: str = env_field("PARALLEL_FINAL_LANE", "mean")

    # -- initialisation (§5.16) --
    orthogonal_init: bool = False  # every linear with both dims >= 64 that is not zero-init
    # S414's rule: names ending in `.proj` (the bigram/VE projections) also get ·1/√(2L);
    # the banked stacks (S549 onward) leave them plain orthogonal.
    aux_proj_scaled_init: bool = False
    # Optimizer role of the bigram/VE projections: "matrix" → Muon (S414 and its non-banked
    # edits) or "scalar" → scalar Adam (banked S549, S1019, S1060; SPEC §5.8, §5.11, §5.18).
    aux_proj_role: str = "matrix"
    # The banked scripts (S549, S1019, S1060, P1351) create the block matrices as empty banks (no
    # draw) and orthogonalise them before the bigram/VE projections; on, the same seed gives
    # their initial weights (off: the non-banked order of S414 and the baseline).
    banked_init: bool = False
    # The order in which banked_init orthogonalises the banks: "layer" = Q, K, V, MLP-up of layer 0,
    # then of layer 1, ... (S549, S1019, S1060, P1351); "qkv-first" = Q, K, V of every layer, then
    # every MLP-up (TOP's `_init_weights`, two loops).
    banked_init_order: str = "layer"

    # -- precision upstream had on CUDA (SPEC §4.3): "off" | "on" | "cuda" (on when pgolf.dist
    # runs on CUDA; the default, so the default model is the baseline's on a GPU as well) --
    # Every script casts its model with `.bfloat16()` and restores only CastedLinear weights,
    # banks and low-dim/control tensors to fp32: the embedding tables (tok_emb, bigram.embed,
    # ve_shared.embed) are trained, averaged and saved in bf16.
    bf16_tables: str = "cuda"
    # The same cast makes RoPE's inv_freq bf16, so the un-rescaled tables (positions included:
    # above 256 they round to even numbers, above 1024 to multiples of 8) are built in bf16;
    # NTK-rescaled tables are rebuilt in fp32 (the sp1024 stacks at 2048 > T0 = 1024).
    rope_bf16: str = "cuda"
