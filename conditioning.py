"""
Conditioning: every embedder the denoiser reads.

    time      t in [0, 1] (1 = pure noise)  -> sinusoidal features -> MLP -> e_t            (B, D)
    class     label (num_classes = null)    -> K learned tokens                           (B, K, D) + pooled (B, D)
    text      prompt -> frozen encoder, cached once per dataset -> features (B, L, d) + mask (B, L)
              -> padding (noisy replicate by default) -> MLP -> L tokens                  (B, L, D) + pooled (B, D)
    control   crop / flip / size / aspect / resolution scalars
              -> Fourier features per scalar -> one MLP per signal group -> e_ctrl,k      (B, groups, D)
              -> gated along the trajectory: sum_k g_k(t) * e_ctrl,k

The paper's point: semantic conditions (class, text) are *what* to draw and go through attention as tokens; control
metadata is *how* it was captured and goes through adaLN, each group switched on by its own schedule of t.
Condition dropout for classifier-free guidance drops the two kinds independently.
"""
import hashlib
import math
import os
import re

import torch
import torch.nn as nn

from data import CONTROL_SIGNALS

#################################################################################
#                              Timestep                                         #
#################################################################################


def sinusoidal(x, dim, max_period=10000.0):
    """DiT / ADM sinusoidal features of a (B,) tensor -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=x.device) / half)
    args = x.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> (B, D). t is scaled by 1000 so the sinusoid spans the same range as DiT's integer steps."""

    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        return self.mlp(sinusoidal(t * 1000.0, self.freq_dim))


#################################################################################
#                        Semantic condition: class tokens                       #
#################################################################################

class ClassEmbedder(nn.Module):
    """Label -> K context tokens (B, K, D) and a pooled vector (B, D). Row `num_classes` is the null class that
    classifier-free guidance uses for the unconditional branch; `drop` (B,) bool selects it per sample."""

    def __init__(self, num_classes, dim, tokens=1):
        super().__init__()
        self.num_classes, self.tokens = num_classes, tokens
        self.table = nn.Embedding(num_classes + 1, tokens * dim)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, y, drop=None):
        if drop is not None:
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        tok = self.table(y).view(y.shape[0], self.tokens, -1)  # (B, K, D)
        return tok, tok.mean(dim=1)


#################################################################################
#                  Semantic condition: text -- frozen encoders                  #
#################################################################################
# An encoder turns prompts into per-token features (B, L, d) and a mask (B, L), True on real tokens. It is frozen:
# the denoiser learns only the projection of its features (TextEmbedder), so the features are computed once per
# dataset (TextCache) and never during training.

TEXT_PADS = ("zero", "replicate", "noisy_replicate")
TEXT_NULLS = ("learned", "empty")
# Hugging Face model types whose checkpoints hold more than the text encoder: load only the encoder half
HF_ENCODERS = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel",
               "clip": "CLIPTextModel", "clip_text_model": "CLIPTextModel"}


class BuiltinTextEncoder:
    """A tiny frozen encoder that needs no download, enough for the shapes dataset's "a red circle" prompts.

    Lower-cased words (runs of letters or digits) -> one fixed vector per word + a small sinusoidal position feature.
    A word's vector is read off the SHAKE-256 hash of the word, uniform with unit variance per channel: no random
    number generator is involved (nor Python's salted hash()), so the features are bit-identical in every process,
    on every machine and under every torch version. Any word, known or not, gets its own vector; random vectors in
    64 dimensions are nearly orthogonal, so words stay distinguishable.

    Prompts longer than max_length words are cut. A prompt with no word at all (the empty string, the null prompt
    of guidance) encodes to one token "<empty>",
    which no real prompt can produce (words never contain "<"): every prompt then has at least one valid
    token, which replicate padding needs, and the empty prompt still has a learnable projection.
    """

    name = "builtin"
    EMPTY = "<empty>"

    def __init__(self, dim=64, max_length=16, device="cpu"):
        self.dim, self.max_length, self.device = dim, max_length, torch.device(device)
        # scaled down so the word identity dominates, as in a sum of token and position embeddings
        self.pos = 0.5 * sinusoidal(torch.arange(max_length), dim, max_period=100.0)  # (L, d)
        self._vectors = {}

    def words(self, text):
        return re.findall(r"[^\W_]+", text.lower())[:self.max_length] or [self.EMPTY]

    def vector(self, word):
        if word not in self._vectors:
            raw = hashlib.shake_256(word.encode("utf-8")).digest(4 * self.dim)
            u = torch.tensor([int.from_bytes(raw[4 * i:4 * i + 4], "little") for i in range(self.dim)],
                             dtype=torch.float64)
            self._vectors[word] = ((u + 0.5) / 2.0 ** 32 - 0.5).mul(math.sqrt(12.0)).float()  # U(-sqrt3, sqrt3)
        return self._vectors[word]

    @torch.no_grad()
    def encode(self, texts):
        """list of B strings -> features (B, L, d) float32, mask (B, L) bool (True on the prompt's words)."""
        texts = [texts] if isinstance(texts, str) else texts
        features = torch.zeros(len(texts), self.max_length, self.dim)
        mask = torch.zeros(len(texts), self.max_length, dtype=torch.bool)
        for i, text in enumerate(texts):
            words = self.words(text)
            features[i, :len(words)] = torch.stack([self.vector(w) for w in words]) + self.pos[:len(words)]
            mask[i, :len(words)] = True
        return features.to(self.device), mask.to(self.device)


def _looks_like_path(name):
    """A Hugging Face id is 'name' or 'org/name'; anything else is meant as a local directory."""
    return name.startswith(("/", ".", "~")) or name.endswith("/") or name.count("/") > 1 or "\\" in name


class HFTextEncoder:
    """A frozen Hugging Face text encoder: the tokenizer pads every prompt to `max_length` and truncates longer ones;
    the features are the encoder's `last_hidden_state`, the mask the tokenizer's attention mask.
    T5 / CLIP checkpoints load only their text encoder (HF_ENCODERS); any other model type loads with AutoModel.
    bf16 on CUDA, fp32 on the CPU; features are returned as float32 either way."""

    def __init__(self, name_or_path, device="cpu", max_length=None):
        path = os.path.expanduser(name_or_path)
        if not os.path.exists(path) and _looks_like_path(name_or_path):
            raise SystemExit(f"text encoder {name_or_path!r}: the path does not exist (give a directory with the "
                             f"model's config, weights and tokenizer, or a Hugging Face model id)")
        try:
            import transformers  # optional: only a Hugging Face encoder needs it
        except ImportError:
            raise SystemExit(f"text encoder {name_or_path!r} needs the transformers package: "
                             f"pip install transformers (or use --text-encoder builtin)") from None
        self.name, self.device = name_or_path, torch.device(device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
        dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
        try:
            config = transformers.AutoConfig.from_pretrained(path)
            model_cls = getattr(transformers, HF_ENCODERS.get(config.model_type, "AutoModel"))
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
            self.model = model_cls.from_pretrained(path, **{dtype_kw: dtype})
        except (OSError, ValueError) as e:
            raise SystemExit(f"could not load text encoder {name_or_path!r}: {e}") from None
        self.model.to(self.device).eval().requires_grad_(False)
        self.max_length = max_length or min(77, self.tokenizer.model_max_length)  # 77: CLIP's context, SD's choice
        self.dim = self.model.config.hidden_size

    @torch.no_grad()
    def encode(self, texts):
        """list of B strings -> features (B, L, d) float32, mask (B, L) bool (True on real tokens)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        batch = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.last_hidden_state.float(), batch["attention_mask"].bool()


def load_text_encoder(name_or_path="builtin", device="cpu", max_length=None):
    """`builtin` (no download; 64 channels, 16 tokens) or a Hugging Face model id / local directory (77 tokens unless
    `max_length` says otherwise). Either has encode(list of str) -> (features (B, L, d), mask (B, L)) and the
    attributes dim, max_length, name."""
    if name_or_path == "builtin":
        return BuiltinTextEncoder(max_length=max_length or 16, device=device)
    return HFTextEncoder(name_or_path, device, max_length)


#################################################################################
#                 Semantic condition: text -- padding and tokens                #
#################################################################################

def pad_text(features, mask, mode="noisy_replicate", noise_std=0.1, generator=None):
    """Fill the padding slots of encoded prompts. features (B, L, d), mask (B, L) bool -> (features, mask).

    zero             padding slots are zeros; the mask is returned as is, for the attention to skip them
    replicate        slot j of a prompt with n valid tokens holds its valid token j mod n (the valid tokens
                     repeated cyclically; valid tokens stay where they are when they come first, as with right
                     padding); every slot is now a real token, so the returned mask is all True
    noisy_replicate  (default, the paper's) replicate, then Gaussian noise on the copies only, of std noise_std x the
                     std of that prompt's valid features (over all its valid tokens and channels): the noise level is
                     relative to the encoder's scale, so one flag value suits every encoder
    A prompt with no valid token at all comes out as zeros, with an all-False mask in zero mode (the encoders here
    always give at least one token, so this never reaches the attention)."""
    if mode not in TEXT_PADS:
        raise ValueError(f"unknown text padding {mode!r}; choose one of {TEXT_PADS}")
    mask = mask.bool()
    if mode == "zero":
        return features * mask[..., None].to(features.dtype), mask
    B, L, d = features.shape
    n = mask.sum(1, keepdim=True)  # (B, 1) valid tokens per prompt
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices  # (B, L) valid positions first
    slot = torch.arange(L, device=features.device)[None]  # (1, L)
    src = order.gather(1, slot % n.clamp(min=1))  # (B, L) the position each slot copies
    out = features.gather(1, src[..., None].expand(-1, -1, d)) * (n > 0)[..., None].to(features.dtype)
    if mode == "noisy_replicate" and noise_std > 0:
        x, valid = features.detach().float(), mask[..., None].float()
        count = (n * d).float()  # (B, 1)
        mean = (x * valid).sum((1, 2)) / count.clamp(min=1)[:, 0]
        std = (((x - mean[:, None, None]) ** 2 * valid).sum((1, 2)) / (count - 1).clamp(min=1)[:, 0]).sqrt()  # (B,)
        noise = torch.randn(out.shape, generator=generator, device=out.device)  # (B, L, d)
        copies = (slot >= n)[..., None].float()  # (B, L, 1): never the valid tokens themselves
        out = out + (noise * copies * (noise_std * std)[:, None, None]).to(out.dtype)
    return out, torch.ones_like(mask)


class TextEmbedder(nn.Module):
    """Encoded prompt -> L context tokens (B, L, D) and a pooled vector (B, D), like ClassEmbedder, so a model holds
    either as `y_embed` (class -> text transfer then loads every other tensor and reports y_embed.* as new).

    The encoder's features are padded (pad_text), then projected by PixArt-alpha's caption projection
    (Linear -> GELU(tanh) -> Linear). pooled = the mean of the projected *valid* tokens, so padding never shifts it.
    A dropped prompt (classifier-free guidance) becomes the null prompt:
      learned (default)  a learned (L, D) token sequence, all of it attended to, pooled = its mean. The class route's
                         null is a learned row too, it needs nothing from the caller or the encoder, and PixArt-alpha
                         learns its null caption the same way.
      empty              the encoded empty string (Stable Diffusion / SD3), padded and projected like any prompt; the
                         caller supplies it once with set_empty(*encoder.encode([""])), and it is saved with the model.
    forward returns the mask for the attention only with zero padding; the replicate modes leave no padding to hide
    (None, so the attention can use its fastest kernel).
    """

    def __init__(self, text_dim, dim, max_length, pad="noisy_replicate", pad_noise=0.1, null="learned"):
        super().__init__()
        if pad not in TEXT_PADS:
            raise ValueError(f"unknown --text-pad {pad!r}; choose one of {TEXT_PADS}")
        if null not in TEXT_NULLS:
            raise ValueError(f"unknown --text-null {null!r}; choose one of {TEXT_NULLS}")
        self.text_dim, self.max_length, self.null_mode = text_dim, max_length, null
        self.pad, self.pad_noise = pad, pad_noise
        self.proj = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        if null == "learned":
            self.null = nn.Parameter(torch.randn(max_length, dim) * 0.02)
        else:  # filled by set_empty or by loading a checkpoint
            self.register_buffer("empty_features", torch.zeros(max_length, text_dim))
            self.register_buffer("empty_mask", torch.zeros(max_length, dtype=torch.bool))
            self.empty_ready = False
            self.register_load_state_dict_post_hook(lambda m, _: setattr(m, "empty_ready", bool(m.empty_mask.any())))

    def set_empty(self, features, mask):
        """Store the encoded empty string, (1, L, d) or (L, d) and (1, L) or (L,), as the null prompt."""
        if self.null_mode != "empty":
            raise ValueError("set_empty is for null='empty'; this embedder learns its null prompt")
        features, mask = features.reshape(-1, features.shape[-1]), mask.reshape(-1)
        if features.shape != self.empty_features.shape or mask.shape != self.empty_mask.shape:
            raise ValueError(f"the empty prompt's features {tuple(features.shape)} do not match this embedder's "
                             f"(max_length, text_dim) = {tuple(self.empty_features.shape)}")
        if not mask.any():
            raise ValueError("the encoded empty prompt has no valid token")
        self.empty_features.copy_(features)
        self.empty_mask.copy_(mask)
        self.empty_ready = True

    def forward(self, features, mask, drop=None, generator=None):
        """features (B, L, d), mask (B, L) bool, drop (B,) bool or None
        -> tokens (B, L, D), pooled (B, D), mask (B, L) bool for the attention or None."""
        mask = mask.bool()
        if drop is not None and self.null_mode == "empty":
            if not self.empty_ready:
                raise RuntimeError("TextEmbedder(null='empty') needs the encoded empty prompt: call "
                                   "set_empty(*encoder.encode(['']))  before training or sampling")
            features = torch.where(drop[:, None, None], self.empty_features.to(features.dtype)[None], features)
            mask = torch.where(drop[:, None], self.empty_mask[None], mask)
        padded, keep = pad_text(features, mask, self.pad, self.pad_noise, generator)
        tokens = self.proj(padded)  # (B, L, D)
        w = mask[..., None].to(tokens.dtype)
        pooled = (tokens * w).sum(1) / w.sum(1).clamp(min=1)  # (B, D) mean over the valid tokens only
        if drop is not None and self.null_mode == "learned":
            null = self.null.to(tokens.dtype)
            tokens = torch.where(drop[:, None, None], null[None], tokens)
            pooled = torch.where(drop[:, None], null.mean(0)[None], pooled)
            keep = keep | drop[:, None]
        return tokens, pooled, (keep if self.pad == "zero" else None)


#################################################################################
#                 Semantic condition: text -- feature cache                     #
#################################################################################

class TextCache:
    """The encoder's features of every distinct caption of a dataset, computed once and kept in one file.

    One torch.save file: features fp16 (U, L, d), mask (U, L), the captions in row order, the encoder's name and
    max_length. build() reuses an existing file made by the same encoder for the same caption set and re-encodes
    otherwise; the file is written to a temporary name and renamed, so a crash never leaves half a cache. Under DDP,
    build on rank 0, barrier, then load on every rank.

    Memory: the whole table lives in RAM, U x L x d x 2 bytes: 0.2 MB for the 80 shapes prompts with the builtin
    encoder; for ImageNet's 1000 class prompts at 77 tokens, 60 MB with MiniLM (d = 384), 0.6 GB with T5-XXL
    (d = 4096). It does not scale to CC12M-sized caption sets (~10^7 captions: 0.7 TB with MiniLM, 7.6 TB with
    T5-XXL): there the features belong next to each image in the latent-cache shards, which is not done here.
    """

    def __init__(self, features, mask, captions, encoder, max_length, path=None):
        self.features, self.mask = features, mask  # (U, L, d) fp16, (U, L) bool
        self.captions = list(captions)
        self.index = {c: i for i, c in enumerate(self.captions)}
        self.encoder, self.max_length, self.path = encoder, max_length, path

    def __len__(self):
        return len(self.captions)

    def __contains__(self, caption):
        return caption in self.index

    def matches(self, encoder):
        return (self.encoder, self.max_length, self.features.shape[-1]) == (encoder.name, encoder.max_length,
                                                                             encoder.dim)

    @staticmethod
    def _encode(texts, encoder, batch=256):
        """-> features fp16 (U, L, d), mask (U, L) on the CPU."""
        L, d = encoder.max_length, encoder.dim
        parts = [encoder.encode(texts[i:i + batch]) for i in range(0, len(texts), batch)]
        features = torch.cat([torch.zeros(0, L, d, dtype=torch.float16)] + [f.half().cpu() for f, _ in parts])
        return features, torch.cat([torch.zeros(0, L, dtype=torch.bool)] + [m.cpu() for _, m in parts])

    @classmethod
    def build(cls, captions, encoder, path, batch=256):
        """The cache of the distinct `captions` at `path`: the file's, if `encoder` made it for this very caption set,
        else encoded anew (`batch` prompts at a time) and written."""
        distinct = sorted(set(captions))
        if os.path.exists(path):
            cache = cls.load(path)
            if cache.matches(encoder) and set(cache.captions) == set(distinct):
                return cache
        features, mask = cls._encode(distinct, encoder, batch)
        cache = cls(features, mask, distinct, encoder.name, encoder.max_length, path)
        cache.save(path)
        return cache

    def save(self, path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save(dict(features=self.features, mask=self.mask, captions=self.captions, encoder=self.encoder,
                        max_length=self.max_length), tmp)
        os.replace(tmp, path)
        self.path = path

    @classmethod
    def load(cls, path):
        """The cache in `path`, whatever made it (build checks that it suits an encoder)."""
        s = torch.load(path, map_location="cpu", weights_only=True)
        return cls(s["features"], s["mask"], s["captions"], s["encoder"], s["max_length"], path)

    def lookup(self, captions, device=None):
        """list of B captions -> features (B, L, d) float32, mask (B, L) bool."""
        for c in captions:
            if c not in self.index:
                raise KeyError(f"caption {c!r} is not in the text cache {self.path or '(in memory)'} of encoder "
                               f"{self.encoder!r}: rebuild the cache (TextCache.build) for this dataset, or encode "
                               f"new prompts on the fly with encode_or_lookup")
        rows = torch.tensor([self.index[c] for c in captions], dtype=torch.long)
        return self.features[rows].float().to(device), self.mask[rows].to(device)

    def encode_or_lookup(self, captions, encoder, device=None):
        """lookup, encoding the captions the cache lacks on the fly (sampling with new prompts). They are rounded to
        fp16 like the cached rows, so a prompt gives the same features either way, and kept in memory (not saved)."""
        if not self.matches(encoder):
            raise ValueError(f"the text cache was made by {self.encoder!r} (max_length {self.max_length}), "
                             f"not by {encoder.name!r} (max_length {encoder.max_length})")
        new = [c for c in dict.fromkeys(captions) if c not in self.index]
        if new:
            features, mask = self._encode(new, encoder)
            self.features, self.mask = torch.cat([self.features, features]), torch.cat([self.mask, mask])
            self.index.update({c: len(self.captions) + i for i, c in enumerate(new)})
            self.captions += new
        return self.lookup(captions, device)


#################################################################################
#                      Control metadata: Fourier features + gates               #
#################################################################################
# Each raw control scalar is brought to a unit-ish scale first (sizes on a log2 scale, crop as a fraction of the
# training resolution) so the same Fourier frequencies suit every signal and every resolution.

CONTROL_GROUPS = {"size": ("orig_h", "orig_w", "aspect", "res"), "crop": ("crop_top", "crop_left"), "flip": ("flip",)}
GATES = ("none", "cosine", "cosine_pow", "linear", "off")
DEFAULT_GATES = {"size": "cosine", "crop": "none", "flip": "none"}


def gate(name, t, power=2.0):
    """Weight g(t) in [0, 1] of a control group at noise level t (t = 1 noise, t = 0 data).
    none: 1 everywhere (ungated); cosine: cos(pi t / 2), 0 at pure noise and 1 at data; cosine_pow: cosine ** power;
    linear: 1 - t; off: 0 everywhere (the group is ignored)."""
    if name == "none":
        return torch.ones_like(t)
    if name == "cosine":
        return torch.cos(0.5 * math.pi * t)
    if name == "cosine_pow":
        return torch.cos(0.5 * math.pi * t).clamp(min=0) ** power
    if name == "linear":
        return 1.0 - t
    if name == "off":
        return torch.zeros_like(t)
    raise ValueError(f"unknown gate {name!r}; choose one of {GATES}")


def normalise_control(ctrl):
    """(B, len(CONTROL_SIGNALS)) raw control -> same shape, unit-ish scale."""
    c = dict(zip(CONTROL_SIGNALS, ctrl.float().unbind(-1)))
    res = c["res"].clamp(min=1.0)
    out = {"orig_h": torch.log2(c["orig_h"].clamp(min=1.0)), "orig_w": torch.log2(c["orig_w"].clamp(min=1.0)),
           "crop_top": c["crop_top"] / res, "crop_left": c["crop_left"] / res, "flip": c["flip"],
           "aspect": torch.log2(c["aspect"].clamp(min=1e-3)), "res": torch.log2(res)}
    return torch.stack([out[k] for k in CONTROL_SIGNALS], dim=-1)


class ControlEmbedder(nn.Module):
    """Control metadata -> one embedding per group (B, G, D), gated per group by g_k(t).

    Fourier features of every normalised scalar (frequencies 2^-4 ... 2^(F-5) cycles per unit), concatenated per group,
    then one MLP per group. A dropped control (for guidance) uses a learned null embedding instead.
    """

    def __init__(self, dim, num_freqs=8, gates=None):
        super().__init__()
        self.gates = dict(DEFAULT_GATES, **(gates or {}))
        for name in self.gates.values():
            gate(name, torch.zeros(1))  # fail at construction on an unknown name
        self.register_buffer("freqs", 2.0 ** torch.arange(-4, num_freqs - 4, dtype=torch.float32), persistent=False)
        self.index = {g: [CONTROL_SIGNALS.index(s) for s in sig] for g, sig in CONTROL_GROUPS.items()}
        self.mlps = nn.ModuleDict({g: nn.Sequential(nn.Linear(2 * num_freqs * len(sig), dim), nn.SiLU(),
                                                    nn.Linear(dim, dim)) for g, sig in self.index.items()})
        self.null = nn.Parameter(torch.zeros(len(self.index), dim))

    def fourier(self, x):
        """(B, S) -> (B, S * 2F)"""
        args = 2 * math.pi * x[..., None] * self.freqs
        return torch.cat([torch.sin(args), torch.cos(args)], dim=-1).flatten(1)

    def forward(self, ctrl, drop=None):
        """ctrl (B, len(CONTROL_SIGNALS)) raw, drop (B,) bool or None -> (B, G, D), ungated."""
        x = normalise_control(ctrl)
        emb = torch.stack([self.mlps[g](self.fourier(x[:, idx])) for g, idx in self.index.items()], dim=1)
        if drop is not None:
            emb = torch.where(drop[:, None, None], self.null.to(emb.dtype)[None], emb)
        return emb

    def gate_weights(self, t):
        """(B,) -> (B, G) weights g_k(t)."""
        return torch.stack([gate(self.gates[g], t) for g in self.index], dim=1)


#################################################################################
#                    Condition dropout for classifier-free guidance             #
#################################################################################

def drop_flags(batch, p_sem, p_ctrl, generator=None, device=None):
    """Which samples drop their semantic and which their control condition: two independent (B,) bool masks (the
    text route passes the first to TextEmbedder as `drop`)."""
    u = torch.rand(2, batch, generator=generator, device=device)
    return u[0] < p_sem, u[1] < p_ctrl

