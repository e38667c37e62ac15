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
    def __init__(self, n_in, n_out, zero=False):
        super().__init__(n_in, n_out, bias=False)
        self.zero = zero
        if zero:
            nn.init.zeros_(self.weight)
        self.weight.role = "matrix"

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

    def forward(self, t, dtype):
        inv_freq, base, nominal = self.inv_freq, C["model.rope_base"], C["model.rope_train_seq_len"]
        if C["model.rope_train_seq_len"] and nominal < t:  # NTK base past the nominal length
            base = base * (t / nominal) ** (self.dims / (self.dims - 2))
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

    def forward(self, x):
        b, t, d = x.shape
        q = self.c_q(x).reshape(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).reshape(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x).reshape(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rms_norm(q), rms_norm(k)
        cos, sin = self.rotary(t, q.dtype)
        k = rotate(k, cos, sin)
        q = rotate(q, cos, sin) * self.q_gain.to(q.dtype)[None, :, None, None]
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads
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

    def forward(self, x, x0):
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(self.norm(x))
        return x + self.mlp_scale.to(x.dtype) * self.mlp(self.norm(x))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        layers, dim = C["model.num_layers"], C["model.model_dim"]
        self.encoder = layers // 2
        self.tok_emb = nn.Embedding(C["model.vocab_size"], dim)
        self.tok_emb.weight.role = "embedding"
        self.skip_weights = scalar(torch.ones(min(self.encoder, layers - self.encoder), dim))
        self.blocks = nn.ModuleList(Block(i) for i in range(layers))
        nn.init.normal_(self.tok_emb.weight, mean=0.0, std=C["model.tied_embed_init_std"])
        if on(C["model.bf16_tables"]):
            self.tok_emb.weight.data = self.tok_emb.weight.data.bfloat16()

    def forward(self, ids, logits_from=0):
        x = x0 = rms_norm(self.tok_emb(ids))
        skips = []
        for i, block in enumerate(self.blocks):
            j = i - self.encoder
            if j >= 0 and j < len(self.skip_weights) and skips:
                x = x + self.skip_weights[j].to(x.dtype) * skips.pop()
            x = block(x, x0)
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
            dtype = torch.bfloat16 if CUDA else torch.float32
            updates = torch.zeros(sum(p.numel() for p in params), device=DEV, dtype=dtype)
            offset = 0
            for j, p in enumerate(params):
                if j % WORLD == RANK and p.grad is not None:
                    g = p.grad
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
                    x = (x.mT if tall else x) * max(1.0, p.size(-2) / p.size(-1)) ** 0.5
                    updates[offset : offset + p.numel()] = x.reshape(-1)
                offset += p.numel()
            if WORLD > 1:
                dist.all_reduce(updates)
            offset = 0
            for p in params:
                if C["train.muon_wd"] > 0:  # decoupled, with the scheduled lr
                    p.mul_(1.0 - group["lr"] * C["train.muon_wd"])
                p.add_(
                    updates[offset : offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"]
                )
                offset += p.numel()


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
        if n == 1 or n % max(C["train.train_log_every"], 1) == 0:
            log(f"step {n}/{ITERATIONS} train_loss {loss:.4f} train_time {ms / 1000:.1f}s")
        if cap_ms is not None and stop_after is None and ms >= cap_ms:
            stop_after = n
    return model, n, ms


class LossModule(nn.Module):  # DDP sees the loss as forward
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        return self.model.loss(x, y)


# -- quantization and the artifact (pgolf's container, version 1) ----------------------------------
CONTROL = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weight")


def quantize(state):
    """The baseline's int8 per row (SPEC §4.8): name → numpy array, plus the meta of each tensor."""
    arrays, entries = {}, {}
    for name in sorted(state, key=lambda k: (-state[k].element_size(), k)):
        t = state[name].detach().cpu().contiguous()
        entry = {"dtype": str(t.dtype)[6:], "shape": list(t.shape)}
        if t.numel() <= 65536:
            entry["scheme"] = "float"
            arrays[name] = t.to(torch.float32 if any(c in name for c in CONTROL) else torch.float16)
        else:
            w, entry["scheme"] = t.float(), "int8_per_row"
            a, step = w.abs(), max(1, (1 << 24) // w.size(1))
            clip = torch.cat(
                [torch.quantile(a[i : i + step], 0.9999984, dim=1) for i in range(0, len(a), step)]
            )
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


def pack(arrays, meta):
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


def unpack(data):
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
            with open(os.path.join(run_dir, "train.log"), "a") as f:
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
    path = os.path.join(run_dir, "artifact.pgolf")
    if RANK == 0:
        data = pack(*quantize(model.state_dict()))
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.replace(path + ".tmp", path)
    if WORLD > 1:
        dist.barrier()
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        state = unpack(f.read())
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
        with open(os.path.join(run_dir, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
    if WORLD > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
