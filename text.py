"""
Frozen text encoders and the caption-feature cache: prompts -> per-token features (B, L, d) and a mask (B, L),
True on real tokens. The encoder is frozen: the denoiser learns only the projection of its features
(conditioning.TextEmbedder), so the features are computed once per dataset (TextCache, which text_features
builds for a training run) and never during training -- unless they would not fit --text-cache-gb (CC12M's
12 M captions), when each batch's captions are encoded in the training step.

    builtin   hashed word vectors + positions, no download, bit-identical in every process (shapes captions)
    HF        a Hugging Face T5 / CLIP / BERT-style encoder (optional `transformers`), 77 tokens by default
"""
import hashlib
import math
import os
import re

import torch
import torch.distributed as dist

from checkpoint import atomic_write
from conditioning import sinusoidal

#################################################################################
#                              Frozen encoders                                  #
#################################################################################
# Hugging Face model types whose checkpoints hold more than the text encoder: load only the encoder half
HF_ENCODERS = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel",
               "clip": "CLIPTextModel", "clip_text_model": "CLIPTextModel"}
# The most tokens per prompt any encoder here is asked for: T5's and BERT's 512 positions, the longest
# context of the encoders a diffusion model is usually paired with (CLIP reads 77). Every token is a context
# token of each attention call and a row of the caption cache, so a length far beyond it only costs memory
# (100 000 tokens took ~10 GB before the first step).
MAX_TEXT_LENGTH = 512


def check_text_length(max_length, most=MAX_TEXT_LENGTH, encoder="any encoder here"):
    """--text-max-length: None (the encoder's default) or a whole number in 1..`most`, the most `encoder`
    reads."""
    if max_length is not None and not 1 <= max_length <= most:
        raise SystemExit(f"--text-max-length must be in 1..{most} (the most tokens {encoder} reads), got "
                         f"{max_length}; leave it out for the encoder's default (builtin 16, Hugging Face "
                         f"min(77, its own))")
    return max_length


class BuiltinTextEncoder:
    """A tiny frozen encoder that needs no download, enough for the shapes dataset's "a red circle" prompts.

    Lower-cased words (runs of letters or digits) -> one fixed vector per word + a small sinusoidal position
    feature. A word's vector is read off the SHAKE-256 hash of the word, uniform with unit variance per
    channel: no random number generator is involved (nor Python's salted hash()), so the features are
    bit-identical in every process, on every machine and under every torch version. Any word, known or not,
    gets its own vector; random vectors in 64 dimensions are nearly orthogonal, so words stay distinguishable.

    Prompts longer than max_length words are cut. A prompt with no word at all (the empty string, the null
    prompt of guidance) encodes to one token "<empty>",
    which no real prompt can produce (words never contain "<"): every prompt then has at least one valid
    token, which replicate padding needs, and the empty prompt still has a learnable projection.
    """

    name = "builtin"
    EMPTY = "<empty>"

    def __init__(self, dim=64, max_length=16, device="cpu"):
        check_text_length(max_length)
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
            # U(-sqrt3, sqrt3)
            self._vectors[word] = ((u + 0.5) / 2.0 ** 32 - 0.5).mul(math.sqrt(12.0)).float()
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
    """A frozen Hugging Face text encoder: the tokenizer pads every prompt to `max_length` and truncates
    longer ones; the features are the encoder's `last_hidden_state`, the mask the tokenizer's attention mask.
    T5 / CLIP checkpoints load only their text encoder (HF_ENCODERS); any other model type loads with
    AutoModel. bf16 on CUDA, fp32 on the CPU; features are returned as float32 either way."""

    def __init__(self, name_or_path, device="cpu", max_length=None):
        path = os.path.expanduser(name_or_path)
        if not os.path.exists(path) and _looks_like_path(name_or_path):
            raise SystemExit(f"text encoder {name_or_path!r}: the path does not exist (give a directory with "
                             f"the model's config, weights and tokenizer, or a Hugging Face model id)")
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
            # its own limit is known before its weights load: a length past it fails here, not in the model
            most = hf_max_tokens(config, self.tokenizer)
            check_text_length(max_length, most, f"text encoder {name_or_path!r}")
            self.model = model_cls.from_pretrained(path, **{dtype_kw: dtype})
        except (OSError, ValueError) as e:
            raise SystemExit(f"could not load text encoder {name_or_path!r}: {e}") from None
        self.model.to(self.device).eval().requires_grad_(False)
        # 77: CLIP's context, SD's choice
        self.max_length = max_length or min(77, most)
        self.dim = self.model.config.hidden_size

    @torch.no_grad()
    def encode(self, texts):
        """list of B strings -> features (B, L, d) float32, mask (B, L) bool (True on real tokens)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        batch = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.last_hidden_state.float(), batch["attention_mask"].bool()


def hf_max_tokens(config, tokenizer):
    """The most tokens a Hugging Face encoder reads: its tokenizer's model_max_length or its learned
    positions (a CLIP checkpoint keeps them in its text_config), whichever are known and fewer. T5's relative
    positions set none, and a tokenizer that states no limit holds a huge placeholder: then
    MAX_TEXT_LENGTH."""
    positions = getattr(getattr(config, "text_config", config), "max_position_embeddings", None)
    known = [n for n in (tokenizer.model_max_length, positions) if isinstance(n, int) and 0 < n < 10 ** 6]
    return min(known + [MAX_TEXT_LENGTH])


def load_text_encoder(name_or_path="builtin", device="cpu", max_length=None):
    """`builtin` (no download; 64 channels, 16 tokens) or a Hugging Face model id / local directory (77 tokens
    unless `max_length` says otherwise). Either has encode(list of str) -> (features (B, L, d), mask (B, L))
    and the attributes dim, max_length, name."""
    check_text_length(max_length)  # 0 is refused here, never read as "the default"
    if name_or_path == "builtin":
        return BuiltinTextEncoder(max_length=16 if max_length is None else max_length, device=device)
    return HFTextEncoder(name_or_path, device, max_length)


# (name, device, max_length) -> a loaded encoder, so a grid or an evaluation does not reload it per call
_LOADED = {}


def shared_text_encoder(name_or_path, device, max_length=None):
    """load_text_encoder, once per process: training, its sample grids and its evaluation share one copy (a
    Hugging Face encoder can take gigabytes). Also filed under the max_length it resolved to, which is what a
    run records."""
    key = (name_or_path, str(device), max_length)
    if key not in _LOADED:
        encoder = load_text_encoder(name_or_path, device, max_length)
        _LOADED[key] = _LOADED[(name_or_path, str(device), encoder.max_length)] = encoder
    return _LOADED[key]


def caption_features(encoder, captions, device):
    """(features (B, L, d), mask (B, L)) of B captions, encoded now and rounded to fp16 as TextCache stores
    them: a caption gives the same input from the cache, from a batch encoded in the training step, and at
    sampling."""
    features, mask = encoder.encode(list(captions))
    return features.half().float().to(device), mask.to(device)


def encode_prompts(encoder, max_length, prompts, device):
    """A text model's input for these prompts (caption_features), from the run's encoder: its name and tokens
    per prompt, loaded once per process."""
    return caption_features(shared_text_encoder(encoder, device, max_length), prompts, device)


def semantic_input(args, facts, labels, device, prompts=None):
    """The model's semantic input for a batch of samples: the labels (B,) of a class model, or a text model's
    (features (B, L, d), mask (B, L)) of `prompts`, which a text model cannot do without."""
    if args.cond_type != "text":
        return torch.as_tensor(labels, device=device)
    if not prompts:
        raise ValueError("a text model samples from prompts: none were given")
    return encode_prompts(args.text_encoder, facts.text_len, prompts, device)


#################################################################################
#                       Caption-feature cache                                   #
#################################################################################

class TextCache:
    """The encoder's features of every distinct caption of a dataset, computed once and kept in one file.

    One torch.save file: features fp16 (U, L, d), mask (U, L), the captions in row order, the encoder's name
    and max_length. build() reuses an existing file made by the same encoder for the same caption set and
    re-encodes otherwise; the file is written to a temporary name and renamed, so a crash never leaves half a
    cache. Under DDP, build on rank 0, barrier, then load on every rank.

    Memory: the whole table lives in RAM, U x L x d x 2 bytes: 15 MB for the 7114 distinct captions of the
    10 000 default shapes images with the builtin encoder; for ImageNet's 1000 class prompts at 77 tokens, 60
    MB with MiniLM (d = 384), 0.6 GB with T5-XXL (d = 4096). It does not scale to CC12M-sized caption sets
    (~10^7 captions: 0.7 TB with MiniLM, 7.6 TB with T5-XXL): text_cache_for then builds none and the captions
    are encoded batch by batch in the training step.
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
        mine = (self.encoder, self.max_length, self.features.shape[-1])
        return mine == (encoder.name, encoder.max_length, encoder.dim)

    @staticmethod
    def _encode(texts, encoder, batch=256):
        """-> features fp16 (U, L, d), mask (U, L) on the CPU."""
        L, d = encoder.max_length, encoder.dim
        parts = [encoder.encode(texts[i:i + batch]) for i in range(0, len(texts), batch)]
        features = torch.cat([torch.zeros(0, L, d, dtype=torch.float16)] + [f.half().cpu() for f, _ in parts])
        return features, torch.cat([torch.zeros(0, L, dtype=torch.bool)] + [m.cpu() for _, m in parts])

    @classmethod
    def build(cls, captions, encoder, path, batch=256):
        """The cache of the distinct `captions` at `path`: the file's, if `encoder` made it for this very
        caption set, else encoded anew (`batch` prompts at a time) and written."""
        distinct = sorted(set(captions))
        if os.path.exists(path):
            try:
                cache = cls.load(path)
            except Exception as e:  # damaged or foreign: it holds only what encoding again gives back
                print(f"text cache {path} is unreadable ({type(e).__name__}): encoding the captions again")
                cache = None
            if cache is not None and cache.matches(encoder) and set(cache.captions) == set(distinct):
                return cache
        features, mask = cls._encode(distinct, encoder, batch)
        cache = cls(features, mask, distinct, encoder.name, encoder.max_length, path)
        cache.save(path)
        return cache

    def save(self, path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        state = dict(features=self.features, mask=self.mask, captions=self.captions, encoder=self.encoder,
                     max_length=self.max_length)
        atomic_write(path, lambda f: torch.save(state, f),
                     advice="then run the command again (or give another --out)")
        self.path = path

    @classmethod
    def load(cls, path):
        """The cache in `path`, whatever made it (build checks that it suits an encoder)."""
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return cls(saved["features"], saved["mask"], saved["captions"], saved["encoder"], saved["max_length"],
                   path)

    def lookup(self, captions, device=None):
        """list of B captions -> features (B, L, d) float32, mask (B, L) bool."""
        for caption in captions:
            if caption not in self.index:
                raise KeyError(f"caption {caption!r} is not in the text cache {self.path or '(in memory)'} "
                               f"of encoder {self.encoder!r}: rebuild the cache (TextCache.build) for this "
                               f"dataset, or encode new prompts on the fly with encode_or_lookup")
        rows = torch.tensor([self.index[c] for c in captions], dtype=torch.long)
        return self.features[rows].float().to(device), self.mask[rows].to(device)

    def encode_or_lookup(self, captions, encoder, device=None):
        """lookup, encoding the captions the cache lacks on the fly (sampling with new prompts). They are
        rounded to fp16 like the cached rows, so a prompt gives the same features either way, and kept in
        memory (not saved)."""
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
#                     The caption features of a training run                    #
#################################################################################

def text_features(dataset, args, device, rank, world):
    """--cond-type text: (the frozen encoder, the dataset's caption features) -- every caption is encoded once
    and training only looks features up; (None, None) for a class model."""
    if args.cond_type != "text":
        return None, None
    encoder = shared_text_encoder(args.text_encoder, device, args.text_max_length)
    return encoder, text_cache_for(dataset, encoder, args, rank, world)


def cache_bytes(distinct, encoder):
    """The size of a TextCache of `distinct` captions: fp16 features, a bool mask."""
    return distinct * encoder.max_length * (2 * encoder.dim + 1)


def text_cache_for(dataset, encoder, args, rank, world):
    """The dataset's caption features, encoded once by rank 0 into --out and read by every rank, when they fit
    --text-cache-gb; else None, and train.py encodes each batch's captions in the training step (frozen,
    no_grad, bf16 on a GPU; caption_features). A streamed dataset cannot list its captions up front: None
    too."""
    try:
        captions = dataset.captions()
    except (AttributeError, NotImplementedError):  # a stream, a latent cache
        if rank == 0:
            print(f"--cond-type text: {args.dataset} cannot list its captions; encoding them batch by batch")
        return None
    distinct = len(set(captions))
    size = cache_bytes(distinct, encoder)
    if size > args.text_cache_gb * 2 ** 30:
        if rank == 0:
            print(f"--cond-type text: {distinct} distinct captions x {encoder.max_length} tokens x "
                  f"{encoder.dim} channels would make a {size / 2 ** 30:.2f} GB feature cache, over "
                  f"--text-cache-gb {args.text_cache_gb:g}: encoding them batch by batch in the training "
                  f"step")
        return None
    tag = f"{args.dataset}-{args.res}-{args.seed}-{encoder.name}"
    name = "".join(ch if ch.isalnum() else "-" for ch in tag)
    path = os.path.join(args.out, f"text-cache-{name}-{encoder.max_length}.pt")
    cache = None
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        cache = TextCache.build(captions, encoder, path)
    if world > 1:
        dist.barrier()
    return cache or TextCache.load(path)
