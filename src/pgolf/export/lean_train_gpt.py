"""The lean submission script: pgolf's pipeline re-written record-style, in one file.

`pgolf.export.lean` fills `C` with a run's settings, folds every setting into the code (so the
branches of techniques that are off disappear), minifies it and wraps it in lzma + base85. It
trains, quantizes, packs and scores with the same arithmetic as pgolf's modules, step for step,
so it reproduces `pgolf run`'s val_bpb and artifact bytes exactly (tests/test_export_lean.py);
`pgolf.export.lean.uncovered` says which settings it lacks; such configs ship the bundle.

  torchrun --standalone --nproc_per_node=8 train_gpt.py      (8×H100)
  python train_gpt.py                                         (one device, or CPU)
Environment: DATA_PATH (fineweb_{train,val}_*.bin and tokenizer.model, default ./data),
RUN_DIR (default ./run_seed<SEED>), SEED, ITERATIONS, MAX_WALLCLOCK_SECONDS.
"""

import contextlib
import copy
import glob
import hashlib
import json
import math
import os
import struct
import time
import zlib

import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

C = {}  # the run's settings, "section.name" → value; filled in by pgolf.export.lean
SEED = int(os.environ.get("SEED", C["train.seed"]))
ITERATIONS = int(os.environ.get("ITERATIONS", C["train.iterations"]))
CAP_S = float(os.environ.get("MAX_WALLCLOCK_SECONDS", C["train.max_wallclock_seconds"]))
DATA = os.environ.get("DATA_PATH", "./data")
RANK = int(os.environ.get("RANK", "0"))
WORLD = int(os.environ.get("WORLD_SIZE", "1"))
CUDA = os.environ.get("PGOLF_DEVICE", "").lower() != "cpu" and torch.cuda.is_available()
DEV = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if CUDA else torch.device("cpu")


def on(mode):  # a precision setting: "on", "off" or "cuda" (on exactly when running on CUDA)
    return mode == "on" or (mode == "cuda" and CUDA)


def autocast():
    return torch.autocast("cuda", torch.bfloat16) if CUDA else contextlib.nullcontext()


def shard(path):  # the official format: 256 int32 header (magic, version, count), then uint16
    header = np.fromfile(path, "<i4", 256)
    assert header[0] == 20240520 and header[1] == 1, f"{path}: not a token shard"
    return np.fromfile(path, "<u2", int(header[2]), offset=1024)


def shards(split):
    files = sorted(glob.glob(os.path.join(DATA, f"fineweb_{split}_" + "[0-9]" * 6 + ".bin")))
    if not files:
        raise FileNotFoundError(f"{DATA}: no fineweb_{split}_NNNNNN.bin shards (set DATA_PATH)")
    return files


# -- model ---------------------------------------------------------------------------------------
def rms_norm(x):
    return F.rms_norm(x, (x.size(-1),))


def scalar(values, role="scalar"):
    p = nn.Parameter(values.float())
    p.role = role
    return p


class Linear(nn.Linear):  # fp32 weight, matmul in the input's dtype; zero-init keeps its draw
    def __init__(self, n_in, n_out, zero=False, role="matrix"):
        super().__init__(n_in, n_out, bias=False)
        self.zero = zero
        if zero:
            nn.init.zeros_(self.weight)
        self.weight.role = role

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


class Rotary(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = dims
        self.register_buffer("inv_freq", self.freqs(C["model.rope_base"]), persistent=False)
        self.key = self.cos = self.sin = None

    def freqs(self, base, device=None):
        exponents = torch.arange(0, self.dims, 2, dtype=torch.float32, device=device) / self.dims
        return 1.0 / (base**exponents)

    def base(self, t):  # the NTK base past the nominal length
        base, nominal = C["model.rope_base"], C["model.rope_train_seq_len"]
        if C["model.rope_train_seq_len"] and nominal < t:
            return base * (t / nominal) ** (self.dims / (self.dims - 2))
        return base

    def forward(self, t, dtype):
        inv_freq, base = self.inv_freq, self.base(t)
        key = (base, inv_freq.device, inv_freq.dtype)
        if self.key != key or self.cos.size(-2) < t:
            if C["model.rope_train_seq_len"] and base != C["model.rope_base"]:
                inv_freq = self.freqs(base, inv_freq.device)
            elif on(C["model.rope_bf16"]):
                inv_freq = inv_freq.bfloat16()
            angles = torch.outer(
                torch.arange(t, device=inv_freq.device, dtype=inv_freq.dtype), inv_freq
            )
            self.cos, self.sin, self.key = angles.cos()[None, None], angles.sin()[None, None], key
        return self.cos[..., :t, :].to(dtype), self.sin[..., :t, :].to(dtype)


def rotate(x, cos, sin):
    dims = 2 * cos.size(-1)
    if C["model.rope_dims"] and dims < x.size(-1):  # partial RoPE: the rest passes through
        return torch.cat((rotate(x[..., :dims], cos, sin), x[..., dims:]), dim=-1)
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, xsa):
        super().__init__()
        self.xsa = xsa
        dim, self.heads, self.kv_heads = (
            C["model.model_dim"],
            C["model.num_heads"],
            C["model.num_kv_heads"],
        )
        self.head_dim = dim // self.heads
        self.c_q = Linear(dim, dim)
        self.c_k = Linear(dim, self.kv_heads * self.head_dim)
        self.c_v = Linear(dim, self.kv_heads * self.head_dim)
        self.proj = Linear(dim, dim, zero=True)
        self.q_gain = scalar(torch.full((self.heads,), C["model.qk_gain_init"]))
        self.rotary = Rotary(C["model.rope_dims"] or self.head_dim)

    def forward(self, x, ve=None, cache=None):
        b, t, d = x.shape
        q = self.c_q(x).reshape(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).reshape(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x)
        if C["model.ve_enabled"] and ve is not None:  # value embeddings join V (SPEC §5.11)
            v = v + ve
        v = v.reshape(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rms_norm(q), rms_norm(k)
        if C["quant.codec"] != "mixed" or cache is None:  # a cache only decodes calibration
            cos, sin = self.rotary(t, q.dtype)
            k, v_all = rotate(k, cos, sin), v
        else:  # [un-rotated keys, rotated keys, their base, values] of the positions so far
            start = 0 if cache[0] is None else cache[0].size(-2)
            cos, sin = self.rotary(start + t, k.dtype)
            cache[0] = k if cache[0] is None else torch.cat((cache[0], k), dim=-2)
            cache[3] = v if cache[3] is None else torch.cat((cache[3], v), dim=-2)
            base = self.rotary.base(start + t)
            if cache[1] is None or base != cache[2]:  # a new NTK base moves every earlier key
                cache[1], cache[2] = rotate(cache[0], cos, sin), base
            else:
                new = rotate(k, cos[..., start:, :], sin[..., start:, :])
                cache[1] = torch.cat((cache[1], new), dim=-2)
            cos, sin, k, v_all = cos[..., start:, :], sin[..., start:, :], cache[1], cache[3]
        q = rotate(q, cos, sin) * self.q_gain.to(q.dtype)[None, :, None, None]
        y = F.scaled_dot_product_attention(
            q, k, v_all, is_causal=q.size(-2) == k.size(-2), enable_gqa=self.kv_heads != self.heads
        )
        if (
            C["model.xsa_last_n"] and self.xsa
        ):  # drop from each head's output its part along its own position's value
            y = y.reshape(b, self.kv_heads, self.heads // self.kv_heads, t, self.head_dim)
            v_hat = F.normalize(v, dim=-1).unsqueeze(2)
            y = (y - (y * v_hat).sum(dim=-1, keepdim=True) * v_hat).reshape(b, self.heads, t, -1)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        dim = C["model.model_dim"]
        self.fc = Linear(dim, int(C["model.mlp_mult"] * dim))
        self.proj = Linear(int(C["model.mlp_mult"] * dim), dim, zero=True)

    def forward(self, x):
        h, slope = self.fc(x), C["model.mlp_leaky_slope"]
        h = torch.relu(h) if C["model.mlp_leaky_slope"] == 0 else F.leaky_relu(h, slope)
        return self.proj(h.square())


class Block(nn.Module):
    def __init__(self, i):
        super().__init__()
        dim, layers, last = C["model.model_dim"], C["model.num_layers"], C["model.xsa_last_n"]
        self.attn = Attention(i >= layers - (layers if last == -1 else min(last, layers)))
        self.mlp = MLP()
        self.attn_scale = scalar(torch.ones(dim))
        self.mlp_scale = scalar(torch.ones(dim))
        self.resid_mix = scalar(torch.stack((torch.ones(dim), torch.zeros(dim))))
        self.ln_scale = 1.0 / math.sqrt(i + 1) if C["model.ln_scale"] else 1.0

    def norm(self, x):
        scaled = C["model.ln_scale"] and self.ln_scale != 1.0  # layer 0's 1/√1 multiplies nothing
        return rms_norm(x) * self.ln_scale if scaled else rms_norm(x)

    def forward(self, x, x0, ve=None, cache=None):
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(self.norm(x), ve, cache)
        return x + self.mlp_scale.to(x.dtype) * self.mlp(self.norm(x))


class Lookup(nn.Module):  # BigramHash (SPEC §5.8) or the value embedding (§5.11): table → proj → ·s
    def __init__(self, rows, dim, width, std, scale):
        super().__init__()
        self.embed = nn.Embedding(rows, dim)
        nn.init.normal_(self.embed.weight, std=std) if std else nn.init.zeros_(self.embed.weight)
        self.embed.weight.role = "embedding"
        self.proj = Linear(dim, width, role=C["model.aux_proj_role"]) if dim != width else None
        self.scale = scalar(torch.tensor(scale))

    def forward(self, ids):
        h = self.embed(ids)
        if self.proj is not None:
            h = self.proj(h)
        return h * self.scale.to(h.dtype)


class Smear(nn.Module):  # SmearGate v1: x_t ← (1 − σ(g))·x_t + σ(g)·x_{t−1} (SPEC §5.7)
    def __init__(self):
        super().__init__()
        self.gate = scalar(torch.zeros(C["model.model_dim"]))

    def forward(self, x):
        g = torch.sigmoid(self.gate.to(x.dtype))
        return (1 - g) * x + g * torch.cat((torch.zeros_like(x[:, :1]), x[:, :-1]), dim=1)


def bigram_buckets(ids):  # (36313·t XOR 27191·t₋₁) mod (K − 1) in int32; position 0: K − 1
    t, mod = ids.to(torch.int32), C["model.bigram_vocab_size"] - 1
    mixed = torch.bitwise_xor(36313 * t[..., 1:], 27191 * t[..., :-1])
    return torch.cat((torch.full_like(t[..., :1], mod), mixed % mod), dim=-1).long()


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        layers, dim = C["model.num_layers"], C["model.model_dim"]
        self.encoder = layers // 2
        self.tok_emb = nn.Embedding(C["model.vocab_size"], dim)
        self.tok_emb.weight.role = "embedding"
        if C["model.bigram_vocab_size"]:
            self.bigram = Lookup(C["model.bigram_vocab_size"], C["model.bigram_dim"], dim, 0, 0.05)
        if C["model.smear_gate"] == "v1":
            self.smear = Smear()
        self.skip_weights = scalar(torch.ones(min(self.encoder, layers - self.encoder), dim))
        with torch.random.fork_rng(devices=[], enabled=C["model.banked_init"]):
            self.blocks = nn.ModuleList(Block(i) for i in range(layers))
        if C["model.ve_enabled"]:  # one shared table, added on the listed layers (SPEC §5.11)
            kv = C["model.num_kv_heads"] * (dim // C["model.num_heads"])
            self.ve_shared = Lookup(C["model.vocab_size"], C["model.ve_dim"], kv, 0.01, 0.1)
            listed = {int(i) % layers for i in C["model.ve_layers"].split(",")}
            self.ve_slot = {i: n for n, i in enumerate(sorted(listed))}
            self.ve_layer_scales = nn.ParameterList(scalar(torch.ones(1)) for _ in listed)
        nn.init.normal_(self.tok_emb.weight, mean=0.0, std=C["model.tied_embed_init_std"])
        if C["model.orthogonal_init"]:  # SPEC §5.16; the banked scripts do the blocks first
            aux = [m.proj for m in self.modules() if isinstance(m, Lookup)]
            order = list(self.modules())
            if C["model.banked_init"]:
                order = list(self.blocks.modules()) + [
                    m for m in order if m not in set(self.blocks.modules())
                ]
            for m in order:
                if isinstance(m, Linear) and not m.zero:
                    if min(m.weight.shape) >= 64:
                        nn.init.orthogonal_(m.weight, gain=1.0)
                    elif m in aux:
                        nn.init.zeros_(m.weight)
        if on(C["model.bf16_tables"]):
            for m in self.modules():
                if isinstance(m, nn.Embedding):
                    m.weight.data = m.weight.data.bfloat16()

    def forward(self, ids, logits_from=0, cache=None):
        window = ids
        if C["quant.codec"] == "mixed" and cache is not None:  # BigramHash, SmearGate look back
            window = ids if cache[-1] is None else torch.cat((cache[-1], ids), dim=1)
            cache[-1] = window[:, -3:]
        x = self.tok_emb(window)
        if C["model.bigram_vocab_size"]:
            x = x + self.bigram(bigram_buckets(window))
        x = rms_norm(x)
        if C["model.smear_gate"] == "v1":
            x = self.smear(x)
        x = x0 = x[:, -ids.size(1) :]
        ve = self.ve_shared(ids) if C["model.ve_enabled"] else None
        skips = []
        for i, block in enumerate(self.blocks):
            j = i - self.encoder
            if j >= 0 and j < len(self.skip_weights) and skips:
                x = x + self.skip_weights[j].to(x.dtype) * skips.pop()
            here = None
            if C["model.ve_enabled"] and i in self.ve_slot:
                here = ve * self.ve_layer_scales[self.ve_slot[i]].to(ve.dtype)
            x = block(x, x0, here, None if cache is None else cache[i])
            if j < 0:
                skips.append(x)
        x = rms_norm(x[:, logits_from:])
        z = F.linear(x, self.tok_emb.weight.to(x.dtype))
        cap = C["model.logit_softcap"]
        return (cap * torch.tanh(z / cap)).float()

    def loss(self, ids, targets):
        logits = self(ids)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


# -- training ------------------------------------------------------------------------------------
class Muon(torch.optim.Optimizer):  # Nesterov momentum, update orthogonalised by Newton-Schulz
    def __init__(self, params):
        super().__init__(params, dict(lr=C["train.matrix_lr"], momentum=C["train.muon_momentum"]))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = group["params"]
            dtype = torch.bfloat16 if CUDA or on(C["train.muon_bf16_state"]) else torch.float32
            updates = torch.zeros(sum(p.numel() for p in params), device=DEV, dtype=dtype)
            offset = 0
            for j, p in enumerate(params):
                if j % WORLD == RANK and p.grad is not None:
                    g = (
                        p.grad.bfloat16() if on(C["train.muon_bf16_state"]) else p.grad
                    )  # banked: bf16 state
                    state = self.state[p]
                    if "buf" not in state:
                        state["buf"] = torch.zeros_like(g)
                    buf = state["buf"].mul_(group["momentum"]).add_(g)
                    x = g.add(buf, alpha=group["momentum"]).to(dtype)
                    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
                    tall = g.size(-2) > g.size(-1)
                    x = x.mT if tall else x
                    for _ in range(C["train.muon_backend_steps"]):
                        a = x @ x.mT
                        x = 3.4445 * x + (-4.7750 * a + 2.0315 * (a @ a)) @ x
                    x = x.mT if tall else x
                    if not on(C["train.muon_bf16_state"]):  # bf16 state: scaled when applied
                        x = x * aspect(p)
                    updates[offset : offset + p.numel()] = x.reshape(-1)
                offset += p.numel()
            if WORLD > 1:
                dist.all_reduce(updates)
            offset = 0
            for p in params:
                if C["train.muon_wd"] > 0:  # decoupled, with the scheduled lr
                    p.mul_(1.0 - group["lr"] * C["train.muon_wd"])
                p.add_(
                    updates[offset : offset + p.numel()].view_as(p).to(p.dtype),
                    alpha=-group["lr"] * (aspect(p) if on(C["train.muon_bf16_state"]) else 1.0),
                )
                offset += p.numel()


def aspect(p):  # a tall matrix's orthogonal rows have RMS √(cols/rows): brought back to 1
    return max(1.0, p.size(-2) / p.size(-1)) ** 0.5


def optimizers(model):
    roles = {"embedding": [], "head": [], "matrix": [], "scalar": []}
    for p in model.parameters():
        roles[p.role].append(p)

    def adam(params, lr, wd):
        group = [{"params": params, "lr": lr, "base_lr": lr}]
        betas = (C["train.beta1"], C["train.beta2"])
        kind = torch.optim.AdamW if wd > 0 else torch.optim.Adam
        return kind(group, betas=betas, eps=C["train.adam_eps"], weight_decay=wd, fused=CUDA)

    muon = Muon(roles["matrix"])
    muon.param_groups[0]["base_lr"] = C["train.matrix_lr"]
    return [
        adam(roles["embedding"], C["train.tied_embed_lr"], C["train.embed_wd"]),
        muon,
        adam(roles["scalar"], C["train.scalar_lr"], C["train.adam_wd"]),
    ]


class Stream:  # the training shards in order, wrapping around; each rank keeps its own slice
    def __init__(self):
        self.files, self.index, self.offset = shards("train"), 0, 0
        self.tokens = shard(self.files[0])

    def take(self, n):
        pieces = []
        while n > 0:
            if self.offset == len(self.tokens):
                self.load((self.index + 1) % len(self.files), 0)
                continue
            k = min(n, len(self.tokens) - self.offset)
            pieces.append(self.tokens[self.offset : self.offset + k])
            self.offset, n = self.offset + k, n - k
        return np.concatenate(pieces)

    def load(self, index, offset):
        self.index, self.offset, self.tokens = index, offset, shard(self.files[index])

    def batch(self, accum):
        span = C["train.train_batch_tokens"] // (WORLD * accum) + 1
        local = torch.from_numpy(
            self.take(span * WORLD)[RANK * span : (RANK + 1) * span].astype(np.int64)
        )
        seq = C["train.train_seq_len"]
        return local[:-1].reshape(-1, seq).to(DEV), local[1:].reshape(-1, seq).to(DEV)


def lr_scale(step, elapsed_ms, cap_ms):
    warmdown = C["train.warmdown_iters"]
    if warmdown <= 0:
        return 1.0
    if not cap_ms:
        start = max(ITERATIONS - warmdown, 0)
        return (
            max((ITERATIONS - step) / max(warmdown, 1), 0.0) if start <= step < ITERATIONS else 1.0
        )
    warmdown_ms = warmdown * elapsed_ms / max(step, 1)
    remaining_ms = max(cap_ms - elapsed_ms, 0.0)
    return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0


def elapsed_ms(t0, cap_ms):  # training time so far, the same number on every rank under a cap
    if CUDA:
        torch.cuda.synchronize()
    ms = 1000.0 * (time.perf_counter() - t0)
    if cap_ms and WORLD > 1:
        t = torch.tensor([ms], dtype=torch.float64, device=DEV)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        ms = float(t.item())
    return ms


def train(log):
    torch.manual_seed(SEED)
    np.random.seed(SEED % 2**32)
    model = GPT().to(DEV)
    accum = C["train.grad_accum_steps"] or 8 // WORLD
    run = model.loss
    if C["train.compile"] and CUDA:
        run = torch.compile(run, dynamic=False, fullgraph=True)
    if WORLD > 1:
        wrapped = nn.parallel.DistributedDataParallel(
            LossModule(model), device_ids=[DEV.index] if CUDA else None, broadcast_buffers=False
        )
        run = wrapped
    opts = optimizers(model)
    stream = Stream()
    if C["train.ema_enabled"]:  # an fp32 shadow of the weights, from the initial ones (SPEC §5.5)
        ema = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    def step(n, scale):
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(accum):
            x, y = stream.batch(accum)
            if WORLD > 1:
                wrapped.require_backward_grad_sync = micro == accum - 1
            with autocast():
                loss = run(x, y)
            (loss / accum).backward()
            total += loss.detach().float().item()
        frac = (
            min(n / C["train.muon_momentum_warmup_steps"], 1.0)
            if C["train.muon_momentum_warmup_steps"] > 0
            else 1.0
        )
        opts[1].param_groups[0]["momentum"] = (1 - frac) * C[
            "train.muon_momentum_warmup_start"
        ] + frac * C["train.muon_momentum"]
        for opt in opts:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale
        if C["train.grad_clip_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.grad is not None], C["train.grad_clip_norm"]
            )
        for opt in opts:
            opt.step()
        return total / accum

    if C["train.warmup_steps"] > 0:  # compile warm-up: real steps, then everything undone
        initial = copy.deepcopy(
            (model.state_dict(), [o.state_dict() for o in opts], stream.index, stream.offset)
        )
        for _ in range(C["train.warmup_steps"]):
            step(0, 1.0)
        model.load_state_dict(initial[0])
        for opt, state in zip(opts, initial[1], strict=True):
            opt.load_state_dict(state)
        stream.load(*initial[2:])
        for opt in opts:
            opt.zero_grad(set_to_none=True)
    cap_ms = 1000.0 * CAP_S if CAP_S > 0 else None
    n, stop_after, t0 = 0, None, time.perf_counter()
    ms = elapsed_ms(t0, cap_ms)
    while n < ITERATIONS and (stop_after is None or n < stop_after):
        loss = step(n, lr_scale(n, ms, cap_ms))
        n += 1
        ms = elapsed_ms(t0, cap_ms)
        if C["train.ema_enabled"]:
            d = ema_decay(n, ms, cap_ms)
            shadow = list(ema.values())
            torch._foreach_mul_(shadow, d)
            torch._foreach_add_(
                shadow, [v.detach().float() for v in model.state_dict().values()], alpha=1.0 - d
            )
        if n == 1 or n % max(C["train.train_log_every"], 1) == 0:
            log(f"step {n}/{ITERATIONS} train_loss {loss:.4f} train_time {ms / 1000:.1f}s")
        if cap_ms is not None and stop_after is None and ms >= cap_ms:
            stop_after = n
    if C["train.ema_enabled"]:
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(ema[k].to(v.dtype))
    return model, n, ms


def ema_decay(step, ms, cap_ms):
    """The record's decay with its window scaled from its step count to this run's expected one."""
    if C["train.ema_decay"] > 0:
        return C["train.ema_decay"]
    steps = float(ITERATIONS)
    if cap_ms and step > 0 and ms > 0:
        steps = min(steps, step * cap_ms / ms)
    ratio = C["train.ema_reference_steps"] / max(steps, 1.0)
    return 1.0 - min((1.0 - C["train.ema_reference_decay"]) * ratio, 1.0)


class LossModule(nn.Module):  # DDP sees the loss as forward
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        return self.model.loss(x, y)


# -- the baseline's int8 + zlib (SPEC §4.8) in pgolf's container, version 1 -----------------------
def quantize_int8(state):
    """The baseline's int8 per row: name → numpy array, plus the meta of each tensor."""
    arrays, entries, control = (
        {},
        {},
        ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weight"),
    )
    for name in sorted(state, key=lambda k: (-state[k].element_size(), k)):
        t = state[name].detach().cpu().contiguous()
        entry = {"dtype": str(t.dtype)[6:], "shape": list(t.shape)}
        if t.numel() <= 65536:
            entry["scheme"] = "float"
            arrays[name] = t.to(torch.float32 if any(c in name for c in control) else torch.float16)
        else:
            w, entry["scheme"] = t.float(), "int8_per_row"
            clip = quantile_rows(w.abs(), 0.9999984)
            scale = torch.clamp(clip / 127.0, min=1.0 / 127.0)
            q = torch.round(torch.clamp(w, -clip[:, None], clip[:, None]) / scale[:, None])
            arrays[name], arrays[name + "::scale"] = (
                torch.clamp(q, -127, 127).to(torch.int8),
                scale.half(),
            )
        entries[name] = entry
    return {k: v.numpy() for k, v in arrays.items()}, {
        "format": "pgolf-int8-per-row-v1",
        "tensors": entries,
    }


def pack_int8(arrays, meta):
    entries, payload = [], b""
    for name, a in arrays.items():
        raw = a.tobytes()
        entries.append(
            {
                "name": name,
                "dtype": str(a.dtype),
                "shape": list(a.shape),
                "offset": len(payload),
                "nbytes": len(raw),
            }
        )
        payload += raw
    body = zlib.compress(payload, 9)
    header = {
        "codec": "zlib",
        "compressed_nbytes": len(body),
        "payload_sha256": hashlib.sha256(body).hexdigest(),
    }
    header.update(payload_nbytes=len(payload), tensors=entries, meta=meta)
    header = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    return struct.pack("<5sBI", b"PGOLF", 1, len(header)) + header + body


def unpack_int8(data):
    (n,) = struct.unpack_from("<I", data, 6)
    header = json.loads(data[10 : 10 + n])
    body = data[10 + n :]
    assert hashlib.sha256(body).hexdigest() == header["payload_sha256"], (
        "artifact: checksum mismatch"
    )
    payload = zlib.decompress(body)
    arrays = {}
    for e in header["tensors"]:
        raw = payload[e["offset"] : e["offset"] + e["nbytes"]]
        arrays[e["name"]] = torch.from_numpy(
            np.frombuffer(raw, e["dtype"]).reshape(e["shape"]).copy()
        )
    state = {}
    for name, entry in header["meta"]["tensors"].items():
        value = arrays[name]
        if entry["scheme"] == "int8_per_row":
            value = value.float() * arrays[name + "::scale"].float().reshape(-1, 1)
        state[name] = value.to(getattr(torch, entry["dtype"]))
    return state


# -- the mixed quantizer (SPEC §5.19–§5.25) and pgolf's container, version 2 ---------------------
@torch.no_grad()
def self_generated(model):
    """Sequences sampled from the model itself (SPEC §5.23), one KV-cache decode per batch."""
    gen = torch.Generator(device=DEV).manual_seed(SEED)
    count, length = C["quant.selfgen_seqs"], C["quant.selfgen_len"] or C["train.train_seq_len"]
    batches = []
    for start in range(0, count, C["quant.selfgen_batch"]):
        cache = [[None] * 4 for _ in model.blocks] + [None]
        ids = torch.randint(
            0, C["model.vocab_size"], (min(C["quant.selfgen_batch"], count - start), 1),
            generator=gen, device=DEV,
        )  # fmt: skip
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = CUDA
        with autocast():  # on CUDA as S1019 samples: bf16 autocast with TF32
            for _ in range(length - 1):
                seen = 0 if cache[0][3] is None else cache[0][3].size(-2)
                logits = model(ids[:, seen:], cache=cache)[:, -1, :].float()
                logits = logits.bfloat16() if CUDA else logits
                probs = torch.softmax(logits / C["quant.selfgen_temperature"], dim=-1)
                ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], dim=1)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        batches.append(ids)
    return batches


@torch.no_grad()
def hessians(model, names):
    """H = Σ xᵀx / tokens of each named linear's input over the self-generated sequences."""
    sums, counts, hooks = {}, {}, []

    def add(name, x):
        x = x.detach().reshape(-1, x.shape[-1]).float()
        sums[name] = sums[name] + (x.T @ x).double() if name in sums else (x.T @ x).double()
        counts[name] = counts.get(name, 0) + x.shape[0]

    model.eval()
    batches = self_generated(model)
    for name, m in model.named_modules():
        if name + ".weight" in names:
            hooks.append(m.register_forward_pre_hook(lambda _, a, n=name + ".weight": add(n, a[0])))
    for x in batches:
        model(x)
    for h in hooks:
        h.remove()
    return {n: (h / float(counts[n])).cpu() for n, h in sums.items()}


def percentile_scales(w, qmax, quantile):  # float16-exact row scales, floored (SPEC §4.8, §5.20)
    a = w.abs()
    clip = a.amax(dim=1) if quantile >= 1.0 else quantile_rows(a, quantile)
    floor = 1.0 / qmax if C["quant.scale_floor"] else 2.0**-24
    scale = (clip.float() / qmax).clamp_min(floor).clamp(min=2.0**-24, max=65504.0)
    return scale.half().float().clamp(min=2.0**-24)


def quantile_rows(a, quantile):  # torch.quantile within its size limit
    step = max(1, (1 << 24) // a.size(1))
    return torch.cat(
        [torch.quantile(a[i : i + step], quantile, dim=1) for i in range(0, len(a), step)]
    )


def rtn(w, scale, qmax):
    return torch.round(w / scale[:, None]).clamp_(-qmax, qmax).to(torch.int8)


def cholesky_factor(h):
    """The upper Cholesky factor of the damped H⁻¹; damping ×10 on failure (4 retries) or None."""
    mean, damp = float(h.diagonal().mean()), C["quant.gptq_damp"]
    for _ in range(5):
        damped = h.clone()
        damped.diagonal().add_(damp * mean)
        chol, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if int(info) == 0:
                return upper.float()
        damp = damp * 10 if damp > 0 else 1e-6
    return None


def gptq_sweep(w, f, scale, qmax):
    """GPTQ's column sweep (act-order, lazy block updates) against fixed row scales (SPEC §5.21)."""
    w, block = w.clone(), C["quant.gptq_block_size"]
    rows, cols = w.shape
    q_t = torch.empty(cols, rows)
    errs, update = torch.empty(block, rows), torch.empty(block, rows)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        n, part, fb = i2 - i1, w[:, i1:i2].T.contiguous(), f[i1:i2, i1:i2]
        diag = fb.diagonal().tolist()
        for j in range(n):
            col, qc, err = part[j], q_t[i1 + j], errs[j]
            torch.div(col, scale, out=qc).round_().clamp_(-qmax, qmax)
            torch.sub(col, torch.mul(qc, scale, out=err), out=err).div_(diag[j])
            part[j + 1 :].sub_(torch.mul(fb[j, j + 1 :, None], err, out=update[: n - j - 1]))
        if i2 < cols:
            w[:, i2:].sub_(errs[:n].T.contiguous() @ f[i1:i2, i2:])
    return q_t.T


def quantize_matrix(w, h, bits, search):
    """(int8 values, row scales): GPTQ once per clip candidate, the lowest plain MSE kept."""
    qmax, w = (1 << (bits - 1)) - 1, w.float()
    swept = w  # what GPTQ (or, if it fails, rounding) quantizes
    factor = None
    if h is not None:
        h, swept = h.double(), w.clone()
        dead = h.diagonal() == 0  # a column no input touched: zeroed, unit diagonal
        h[dead, dead] = 1.0
        swept[:, dead] = 0.0
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        factor = cholesky_factor(h[perm][:, perm])
    best = None
    quantiles = (0.999, 0.9995, 0.9999, 0.99999, 1.0) if search else (C["quant.clip_percentile"],)
    for quantile in quantiles:
        scale = percentile_scales(w, qmax, quantile)
        if factor is None:
            q = rtn(swept, scale, qmax)
        else:
            q = gptq_sweep(swept[:, perm], factor, scale, qmax)[:, torch.argsort(perm)]
            q = q.to(torch.int8)
        mse = float((q.float() * scale[:, None] - w).square().mean())
        if best is None or mse < best[0]:
            best = (mse, q, scale)
    return best[1], best[2]


def quantize_mixed(model, hess):
    """Every tensor by its plan (SPEC §5.19): name → numpy array, plus the meta of each tensor."""
    roles = {n: p.role for n, p in model.named_parameters()}
    arrays, entries = {}, {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        entry = {"scheme": "float16", "dtype": str(t.dtype)[6:], "shape": list(t.shape)}
        role = roles.get(name)
        if t.numel() <= C["quant.keep_float_max_numel"] or t.ndim != 2 or role == "scalar":
            arrays[name] = t.half().numpy()
        else:
            if role == "embedding":  # the tied embedding, or a lookup table: int8 rows, no GPTQ
                qclass = "embed" if name == "tok_emb.weight" else "table"
                bits = C["quant.embed_bits"] if qclass == "embed" else 8
                q, scale = quantize_matrix(t, None, bits, False)
            else:
                qclass = "mlp" if ".mlp." in name else "attn" if ".attn." in name else "matrix"
                bits = C["quant.matrix_bits"]
                q, scale = quantize_matrix(t, hess.get(name), bits, True)
            arrays[name], arrays[name + "::scale"] = q.numpy(), scale.half().numpy()
            entry.update(scheme="int", bits=bits, qclass=qclass)
        entries[name] = entry
    return arrays, {"format": "pgolf-mixed-v1", "tensors": entries}


def frequencies(counts):  # integer frequencies summing to 2**16, each present symbol ≥ 1
    present = counts > 0
    freq = np.where(present, np.maximum(1, np.floor(counts * 65536 / counts.sum())), 0)
    freq, diff = freq.astype(np.int64), 65536 - int(freq.sum())
    order, i = np.argsort(-counts, kind="stable"), 0
    while diff:  # the remainder goes to (or comes from) the most frequent symbols
        j, step = order[i % int(present.sum())], 1 if diff > 0 else -1
        if freq[j] + step >= 1:
            freq[j] += step
            diff -= step
        i += 1
    return freq


def lanes(n):
    return int(min(4096, max(1, n // 8192)))


def rans_encode(raw):
    """pgolf's order-0 interleaved rANS over int8 symbols (pgolf.artifact.rans)."""
    sym = np.frombuffer(raw, np.int8).astype(np.int64)
    n, lo, hi = sym.size, int(sym.min()), int(sym.max())
    if lo == hi:
        return struct.pack("<BIHhH", 1, n, 0, lo, 1) + struct.pack("<H", 0)
    freq = frequencies(np.bincount(sym - lo, minlength=hi - lo + 1))
    cum = np.concatenate(([0], np.cumsum(freq)[:-1]))
    m, shift = lanes(n), np.uint64(16)
    f_sym, c_sym = freq[sym - lo].astype(np.uint64), cum[sym - lo].astype(np.uint64)
    x, chunks = np.full(m, 1 << 16, dtype=np.uint64), []
    for t in range(-(-n // m) - 1, -1, -1):
        a, b = t * m, min(n, (t + 1) * m)
        f, c, xs = f_sym[a:b], c_sym[a:b], x[: b - a]
        emit = xs >= (f << shift)  # renormalise: give away the low 16 bits first
        chunks.append((xs[emit] & np.uint64(0xFFFF)).astype("<u2"))
        xs[emit] >>= shift
        x[: b - a] = ((xs // f) << shift) + (xs % f) + c
    head = struct.pack("<BIHhH", 1, n, m, lo, hi - lo + 1) + freq.astype("<u2").tobytes()
    return head + x.astype("<u4").tobytes() + np.concatenate(chunks[::-1]).astype("<u2").tobytes()


def rans_decode(blob):
    _, n, m, lo, k = struct.unpack_from("<BIHhH", blob)
    freq = np.frombuffer(blob, "<u2", k, 11).astype(np.int64)
    if k == 1:
        return np.full(n, lo, np.int8).tobytes()
    cum = np.concatenate(([0], np.cumsum(freq)[:-1])).astype(np.uint64)
    slot_sym = np.repeat(np.arange(k), freq)
    x = np.frombuffer(blob, "<u4", m, 11 + 2 * k).astype(np.uint64)
    words = np.frombuffer(blob, "<u2", offset=11 + 2 * k + 4 * m).astype(np.uint64)
    out, w, shift, f64 = np.empty(n, np.int64), 0, np.uint64(16), freq.astype(np.uint64)
    for t in range(-(-n // m)):
        a, b = t * m, min(n, (t + 1) * m)
        xs = x[: b - a]
        s = slot_sym[(xs & np.uint64(0xFFFF)).astype(np.int64)]
        out[a:b] = s
        xs = f64[s] * (xs >> shift) + (xs & np.uint64(0xFFFF)) - cum[s]
        need = xs < (1 << 16)
        xs[need] = (xs[need] << shift) | words[w : w + int(need.sum())]
        w += int(need.sum())
        x[: b - a] = xs
    return (out + lo).astype(np.int8).tobytes()


def codec(name):  # (compress(raw, itemsize), decompress(blob, itemsize)) of a section codec
    import lzma

    import brotli

    def shuffle(raw, size):
        return np.frombuffer(raw, np.uint8).reshape(-1, size).T.tobytes()

    def unshuffle(raw, size):
        return np.frombuffer(raw, np.uint8).reshape(size, -1).T.tobytes()

    lzma_filters = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
    if name == "zstd":
        import zstandard

    return {
        "none": (lambda b, i: b, lambda b, i: b),
        "zlib": (lambda b, i: zlib.compress(b, 9), lambda b, i: zlib.decompress(b)),
        "zstd": (
            lambda b, i: zstandard.ZstdCompressor(level=22).compress(b),
            lambda b, i: zstandard.ZstdDecompressor().decompress(b, max_output_size=1 << 31),
        ),
        "lzma": (
            lambda b, i: lzma.compress(b, format=lzma.FORMAT_RAW, filters=lzma_filters),
            lambda b, i: lzma.decompress(b, format=lzma.FORMAT_RAW, filters=lzma_filters),
        ),
        "brotli": (lambda b, i: brotli.compress(b, quality=11), lambda b, i: brotli.decompress(b)),
        "shuffle-brotli": (  # byte k of every item together: float16 exponents compress
            lambda b, i: brotli.compress(shuffle(b, i), quality=11),
            lambda b, i: unshuffle(brotli.decompress(b), i),
        ),
        "rans": (lambda b, i: rans_encode(b), lambda b, i: rans_decode(b)),
    }[name]


def pack_sections(arrays, meta, compressor, groups=None, chosen=None):
    """pgolf's container, version 2: sections of same-dtype arrays, each with its own codec."""
    import brotli

    if groups is None:  # big int8 tensors alone, the rest one section per dtype
        groups, by_dtype = [], {}
        for name, a in arrays.items():
            if a.dtype == np.int8 and a.size >= 65536:
                groups.append([name])
            elif str(a.dtype) in by_dtype:
                by_dtype[str(a.dtype)].append(name)
            else:
                by_dtype[str(a.dtype)] = [name]
                groups.append(by_dtype[str(a.dtype)])
    sections, blobs, codecs = [], [], []
    for i, group in enumerate(groups):
        dtype = str(arrays[group[0]].dtype)
        raw = b"".join(arrays[n].tobytes() for n in group)
        byte_data = dtype == "int8"
        fits = {"rans": byte_data, "shuffle-brotli": not byte_data}  # the others take any dtype
        auto = ("rans", "zstd", "shuffle-brotli", "brotli", "lzma")  # smallest kept, first on ties
        tried = [c for c in auto if fits.get(c, True)]
        if chosen is not None:
            tried = [chosen[i]]
        elif compressor != "auto" and fits.get(compressor, True):
            tried = [compressor]
        best = None
        for name in tried:
            blob = codec(name)[0](raw, arrays[group[0]].itemsize)
            if best is None or len(blob) < len(best[1]):
                best = (name, blob)
        sections.append(
            {
                "codec": best[0],
                "nbytes": len(best[1]),
                "tensors": [[n, dtype, list(arrays[n].shape)] for n in group],
            }
        )
        blobs.append(best[1])
        codecs.append(best[0])
    header = json.dumps({"sections": sections, "meta": meta}, separators=(",", ":")).encode()
    header = brotli.compress(header, quality=11)
    body = header + b"".join(blobs)
    data = struct.pack("<5sBI", b"PGOLF", 2, len(header)) + hashlib.sha256(body).digest() + body
    return data, groups, codecs


def estimate(counts):  # rANS's coded size from a histogram, to search pruning counts
    nz = np.flatnonzero(counts)
    if len(nz) <= 1:
        return float(11 + 2 * max(len(nz), 1))
    span = counts[nz[0] : nz[-1] + 1]
    freq, used = frequencies(span), span > 0
    bits = -(span[used] * np.log2(freq[used] / 65536)).sum()
    return float(11 + 2 * len(span) + 4 * lanes(int(counts.sum())) + bits / 8.0)


def fit(arrays, meta, hess, target):
    """Pack under `target` bytes: the codec, then `auto`, then ±1 pruning (SPEC §1.2, §5.24)."""
    compressor = C["quant.compressor"]
    data, groups, codecs = pack_sections(arrays, meta, compressor)
    if len(data) <= target:
        return data
    if compressor != "auto":  # the lossless knob first
        compressor = "auto"
        data, groups, codecs = pack_sections(arrays, meta, compressor)
        if len(data) <= target:
            return data
    assert C["quant.fit_prune"] != "none", f"artifact {len(data):,} bytes > {target:,}"
    names = [n for n, e in meta["tensors"].items() if e["scheme"] == "int"]
    tids, idxs, vals, costs = [], [], [], []
    for t, name in enumerate(names):  # the ±1 entries, cheapest first: s_row²·H_jj (P639)
        flat = arrays[name].ravel()
        idx = np.flatnonzero(np.abs(flat) == 1)
        rows, cols = np.divmod(idx, arrays[name].shape[1])
        cost = (arrays[name + "::scale"].astype(np.float64)[rows] * flat[idx]) ** 2
        if name in hess:
            cost = cost * hess[name].diagonal().double().numpy()[cols]
        tids.append(np.full(idx.size, t, np.int32))
        idxs.append(idx.astype(np.int64))
        vals.append(flat[idx].astype(np.int16))
        costs.append(cost)
    order = np.argsort(np.concatenate(costs), kind="stable")
    tids, idxs, vals = (np.concatenate(a)[order] for a in (tids, idxs, vals))
    hist0 = np.stack(
        [np.bincount(arrays[n].ravel().astype(np.int64) + 128, minlength=256) for n in names]
    )
    base, original, unpruned, margin = sum(map(estimate, hist0)), dict(arrays), len(data), 0

    def saving(n):
        moved = np.bincount(tids[:n].astype(np.int64) * 256 + vals[:n] + 128, minlength=hist0.size)
        moved = moved.reshape(hist0.shape)
        hist = hist0 - moved
        hist[:, 128] += moved.sum(axis=1)
        return base - sum(map(estimate, hist)) if n else 0.0

    for _ in range(8):
        lo, hi = 0, len(tids)
        while lo < hi:  # the fewest entries whose estimated saving covers the overshoot
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if saving(mid) >= unpruned - (target - margin) else (mid + 1, hi)
        for t, name in enumerate(names):
            arrays[name] = original[name].copy()
            arrays[name].reshape(-1)[idxs[:lo][tids[:lo] == t]] = 0
        data = pack_sections(arrays, meta, compressor, groups, codecs)[0]
        if len(data) <= target or lo == len(tids):
            break
        margin += len(data) - target + 64
    assert len(data) <= target, f"artifact {len(data):,} bytes > {target:,} after pruning"
    return data


def unpack_sections(data):
    import brotli

    (n,) = struct.unpack_from("<I", data, 6)
    assert hashlib.sha256(data[42:]).digest() == data[10:42], "artifact: checksum mismatch"
    header, pos, arrays = json.loads(brotli.decompress(data[42 : 42 + n])), 42 + n, {}
    for section in header["sections"]:
        size = np.dtype(section["tensors"][0][1]).itemsize
        raw = codec(section["codec"])[1](data[pos : pos + section["nbytes"]], size)
        pos, offset = pos + section["nbytes"], 0
        for name, dtype, shape in section["tensors"]:
            count = math.prod(shape)
            arrays[name] = np.frombuffer(raw, dtype, count, offset).reshape(shape).copy()
            offset += count * size
    state = {}
    for name, entry in header["meta"]["tensors"].items():
        value = torch.from_numpy(arrays[name])
        if entry["scheme"] == "int":
            value = value.float() * torch.from_numpy(arrays[name + "::scale"]).float()[:, None]
        state[name] = value.to(getattr(torch, entry["dtype"]))
    return state


# -- evaluation ----------------------------------------------------------------------------------
def byte_tables(vocab):  # bytes of each token, and whether a leading ▁ counts a space (SPEC §3.1)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(DATA, "tokenizer.model"))
    n = max(sp.vocab_size(), vocab)
    base, space, boundary = np.zeros(n, np.int64), np.zeros(n, bool), np.ones(n, bool)
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        space[i] = lead = piece.startswith("\u2581")
        base[i] = len(piece[lead:].encode())
    return [torch.as_tensor(a, device=DEV) for a in (base, space, boundary)]


def windows(n):
    """(starts, lengths, first scored offset) of each window over n targets (SPEC §3.5, §3.6)."""
    seq = C["eval.eval_seq_len"] or C["train.train_seq_len"]
    if C["eval.eval_mode"] == "sliding":  # every target scored once, after T − s of context
        stride = C["eval.eval_stride"]
        context = seq - stride
        starts = np.arange(-(-(n - context) // stride) if n > context else 1) * stride
        return starts, np.minimum(starts + seq, n) - starts, np.where(starts > 0, context, 0)
    starts = np.arange(n // seq) * seq  # disjoint windows; the last n mod T targets unscored
    return starts, np.full(len(starts), seq), np.zeros(len(starts), np.int64)


@torch.no_grad()
def evaluate(model, tokens, tables):
    """(val_loss, val_bpb): float64 sums over the windows, split over the ranks."""
    seq = C["eval.eval_seq_len"] or C["train.train_seq_len"]
    starts, lengths, score_from = windows(max(len(tokens) - 1, 0))
    per_batch = max(C["eval.val_batch_tokens"] // (seq * WORLD), 1)
    if C["eval.eval_mode"] == "sliding":
        per_batch = C["eval.eval_batch_windows"]
    compile_eval = C["eval.compile"] == "on" or (C["eval.compile"] == "auto" and CUDA)
    runner = torch.compile(model) if compile_eval else model
    model.eval()
    acc = torch.zeros(3, dtype=torch.float64, device=DEV)
    base, space, boundary = tables
    offsets = np.arange(seq)[None]
    share = range(len(starts) * RANK // WORLD, len(starts) * (RANK + 1) // WORLD)
    for lo in range(share.start, share.stop, per_batch):
        hi = min(lo + per_batch, share.stop)
        valid = offsets < lengths[lo:hi, None]
        pos = starts[lo:hi, None] + offsets
        x, y = (np.where(valid, tokens[np.where(valid, p, 0)], 0) for p in (pos, pos + 1))
        first = int(score_from[lo:hi].min())  # no logits for positions that are context only
        mask = torch.from_numpy(valid & (offsets >= score_from[lo:hi, None]))[:, first:].to(DEV)
        x = torch.from_numpy(x.astype(np.int64)).to(DEV)
        y = torch.from_numpy(y[:, first:].astype(np.int64)).to(DEV)
        with autocast():
            logits = runner(x, logits_from=first)
        nll = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), reduction="none"
        ).view_as(y)
        nbytes = base[y] + (space[y] & ~boundary[x[:, first:]]).long()
        nats = torch.where(mask, nll.double(), 0.0).sum()
        acc += torch.stack((nats, torch.where(mask, nbytes, 0).sum().double(), mask.sum().double()))
    model.train()
    if WORLD > 1:
        dist.all_reduce(acc)
    nats, nbytes, count = acc.double().tolist()
    return nats / count, nats / (math.log(2) * nbytes)


def main():
    if WORLD > 1:
        dist.init_process_group("nccl" if CUDA else "gloo")
    if CUDA:
        torch.cuda.set_device(DEV)
    run_dir = os.environ.get("RUN_DIR", f"run_seed{SEED}")
    os.makedirs(run_dir, exist_ok=True)

    def log(text):
        if RANK == 0:
            print(text, flush=True)
            with open(os.path.join(run_dir, C["rundir.TRAIN_LOG"]), "a") as f:
                print(text, file=f)

    tokens = np.concatenate([shard(p) for p in shards("val")])
    tokens = tokens[: C["eval.max_val_tokens"] or len(tokens)]
    tables = byte_tables(C["model.vocab_size"])
    model, steps, ms = train(log)
    pre_loss, pre_bpb = evaluate(model, tokens, tables)
    log(
        f"stopped at step {steps}: train_time {ms / 1000:.1f}s "
        f"pre_quant val_loss {pre_loss:.4f} val_bpb {pre_bpb:.4f}"
    )
    path = os.path.join(run_dir, C["rundir.ARTIFACT"])
    if RANK == 0:
        if C["quant.codec"] == "mixed":  # GPTQ on self-generated calibration, fitted to the cap
            gptq = [n for n, p in model.named_parameters() if p.role == "matrix" and p.ndim == 2]
            hess = hessians(
                model,
                [
                    n
                    for n in gptq
                    if model.get_parameter(n).numel() > C["quant.keep_float_max_numel"]
                ],
            )
            code = C["quant.code_bytes"] or os.path.getsize(__file__)
            target = C["quant.target_bytes"] or C["rules.BYTES_CAP"] - code
            data = fit(*quantize_mixed(model, hess), hess, target)
        else:
            data = pack_int8(*quantize_int8(model.state_dict()))
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.replace(path + ".tmp", path)
    if WORLD > 1:
        dist.barrier()
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        state = (unpack_sections if C["quant.codec"] == "mixed" else unpack_int8)(f.read())
    model = GPT()
    model.load_state_dict(state)
    val_loss, val_bpb = evaluate(model.to(DEV), tokens, tables)
    report = dict(val_bpb=val_bpb, val_loss=val_loss, pre_quant_val_bpb=pre_bpb, steps=steps)
    report.update(eval_time_s=time.perf_counter() - t0, bytes_model=os.path.getsize(path))
    report.update(bytes_code=os.path.getsize(__file__), seed=SEED, train_time_s=ms / 1000)
    report["bytes_total"] = report["bytes_model"] + report["bytes_code"]
    for key, value in report.items():
        log(f"{key}: {value!r}")
    if RANK == 0:
        with open(os.path.join(run_dir, C["rundir.REPORT"]), "w") as f:
            json.dump(report, f, indent=1)
    if WORLD > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
