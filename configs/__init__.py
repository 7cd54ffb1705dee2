"""Model configurations shipped with the harness: one JSON file per Gemma variant.

Each ``<name>.json`` holds the HF ``config.json`` dict of a released Gemma 1/2/3 text model or the
``text_config`` dict of a released Gemma 4 model (or of a tiny random-weight twin, ``<name>-tiny``,
that keeps its parent's structural features), plus the published parameter counts of the released
models.  Stdlib only.

An image-text variant (``<name>-mm``, HF model type ``gemma3``) holds the whole multimodal config: its
``vision_config`` and the image token ids, and as ``text_config`` the *name* of the text config it
shares (``"gemma-3-4b"``), which :func:`hf_config` fills in. :func:`names` lists the *core* variants
(the text decoders of Gemma 1-4, which one decoder class builds) unless asked for the others: the
image-text models and Gemma 3n (``core=False``, or ``None`` for all).

    >>> import configs
    >>> configs.names(tiny=False)[:2]
    ['gemma-2b', 'gemma-7b']
    >>> configs.hf_config("gemma-2-9b")["query_pre_attn_scalar"]
    256
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "CONFIG_DIR", "names", "load", "hf_config", "text_config", "cut", "broken"]

CONFIG_DIR = Path(__file__).resolve().parent

_MODEL_TYPES = {1: "gemma", 2: "gemma2", 3: "gemma3_text", 4: "gemma4_text"}
_MULTIMODAL_TYPES = {3: ("gemma3", "gemma3n"), 4: ("gemma4",)}  # generation -> HF model types of its image-text models
_BEYOND_CORE = {"gemma3", "gemma4", "gemma3n_text", "gemma3n"}  # model types outside the core text decoders
_HF_MULTIMODAL = {
    "gemma3": ("vision_config", "mm_tokens_per_image", "image_token_index", "boi_token_index", "eoi_token_index"),
    "gemma4": ("vision_config", "audio_config", "image_token_id", "audio_token_id", "video_token_id", "boi_token_id",
               "eoi_token_id", "boa_token_id", "eoa_token_index"),
    "gemma3n": ("vision_config", "audio_config", "vision_soft_tokens_per_image", "audio_soft_tokens_per_image",
                "image_token_id", "audio_token_id", "boi_token_id", "eoi_token_id", "boa_token_id", "eoa_token_id"),
}

_TOP_KEYS = ("name", "generation", "tiny_of", "description", "published_params", "hf_config")
_PUBLISHED_KEYS = ("total", "embedding", "non_embedding", "tolerance", "source", "scope")
_HF_COMMON = (
    "model_type",
    "architectures",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_parameters",
    "max_position_embeddings",
    "attention_bias",
    "tie_word_embeddings",
    "pad_token_id",
    "eos_token_id",
    "bos_token_id",
)
_HF_LOCAL_GLOBAL = (
    "hidden_activation",
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "sliding_window",
    "layer_types",
)
# Gemma 4 has no query_pre_attn_scalar / attention softcap; HF silently defaults global_head_dim to 512 and
# the PLE / MoE fields to values no released model uses, so every structural field is required.
_HF_GEMMA4 = (
    "hidden_activation",
    "final_logit_softcapping",
    "sliding_window",
    "layer_types",
    "num_global_key_value_heads",
    "global_head_dim",
    "attention_k_eq_v",
    "hidden_size_per_layer_input",
    "vocab_size_per_layer_input",
    "num_kv_shared_layers",
    "use_double_wide_mlp",
    "enable_moe_block",
    "num_experts",
    "top_k_experts",
    "moe_intermediate_size",
)
_HF_GEMMA3N = (
    "hidden_activation",
    "final_logit_softcapping",
    "sliding_window",
    "layer_types",
    "hidden_size_per_layer_input",
    "vocab_size_per_layer_input",
    "num_kv_shared_layers",
    "activation_sparsity_pattern",
    "altup_num_inputs",
    "altup_active_idx",
    "altup_coef_clip",
    "altup_correct_scale",
    "laurel_rank",
)
_HF_KEYS = {
    "gemma": _HF_COMMON + ("hidden_act",),
    "gemma2": _HF_COMMON + _HF_LOCAL_GLOBAL,
    "gemma3_text": _HF_COMMON + _HF_LOCAL_GLOBAL,
    "gemma4_text": _HF_COMMON + _HF_GEMMA4,
    "gemma3n_text": _HF_COMMON + _HF_GEMMA3N,
}
_OTHER_TEXT_TYPES = {3: ("gemma3n_text",)}  # generation -> text model types beside its main one (Gemma 3n)


class ConfigError(ValueError):
    """A config file is malformed (the message names the file and the offending key)."""


def _fail(path: Path, msg: str) -> ConfigError:
    return ConfigError(f"{path.name}: {msg}")


def _validate(path: Path, data: Any) -> None:
    if not isinstance(data, dict):
        raise _fail(path, "top level must be a JSON object")
    for key in _TOP_KEYS:
        if key not in data:
            raise _fail(path, f"missing required key '{key}'")
    if data["name"] != path.stem:
        raise _fail(path, f"key 'name' is {data['name']!r}, expected the file stem {path.stem!r}")
    gen = data["generation"]
    if gen not in _MODEL_TYPES:
        raise _fail(path, f"key 'generation' is {gen!r}, expected one of {sorted(_MODEL_TYPES)}")
    tiny_of = data["tiny_of"]
    pub = data["published_params"]
    if tiny_of is None:
        if not isinstance(pub, dict):
            raise _fail(path, "key 'published_params' must be an object for a released variant")
        image_text = isinstance(data["hf_config"], dict) and data["hf_config"].get("model_type") in ("gemma4", "gemma3n")
        # Gemma 4's and Gemma 3n's image-text models are published as one total (no embedding split)
        for key in ("total", "tolerance", "source", "scope") if image_text else _PUBLISHED_KEYS:
            if key not in pub:
                raise _fail(path, f"missing required key 'published_params.{key}'")
    else:
        if not isinstance(tiny_of, str) or not (CONFIG_DIR / f"{tiny_of}.json").is_file():
            raise _fail(path, f"key 'tiny_of' is {tiny_of!r}, which names no config file")
        if pub is not None:
            raise _fail(path, "key 'published_params' must be null for a tiny twin")
    hf = data["hf_config"]
    if not isinstance(hf, dict):
        raise _fail(path, "key 'hf_config' must be an object")
    if hf.get("model_type") in _MULTIMODAL_TYPES.get(gen, ()):
        _validate_multimodal(path, hf)
        return
    model_type = hf.get("model_type")
    if model_type != _MODEL_TYPES[gen] and model_type not in _OTHER_TEXT_TYPES.get(gen, ()):
        raise _fail(
            path,
            f"key 'hf_config.model_type' is {model_type!r}, expected {_MODEL_TYPES[gen]!r} for generation {gen}",
        )
    for key in _HF_KEYS[model_type]:
        if key not in hf:
            raise _fail(path, f"missing required key 'hf_config.{key}'")
    layer_types = hf.get("layer_types")
    if layer_types is not None and len(layer_types) != hf["num_hidden_layers"]:
        raise _fail(
            path,
            f"key 'hf_config.layer_types' has {len(layer_types)} entries for "
            f"num_hidden_layers={hf['num_hidden_layers']}",
        )


def _validate_multimodal(path: Path, hf: dict) -> None:
    for key in _HF_MULTIMODAL[hf["model_type"]]:
        if key not in hf:
            raise _fail(path, f"missing required key 'hf_config.{key}'")
    text = hf.get("text_config")
    if not isinstance(text, str) or not (CONFIG_DIR / f"{text}.json").is_file():
        raise _fail(path, f"key 'hf_config.text_config' is {text!r}; it must name the text config file it shares")
    if not isinstance(hf["vision_config"], dict):
        raise _fail(path, "key 'hf_config.vision_config' must be an object")


@functools.cache
def _read(name: str) -> dict[str, Any]:
    path = CONFIG_DIR / f"{name}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise _fail(path, f"invalid JSON ({exc})") from None
    _validate(path, data)
    return data


def _all_names() -> list[str]:
    return [p.stem for p in CONFIG_DIR.glob("*.json")]


def _order(name: str) -> tuple[int, int, int, str]:
    """Generation, then the released parent's size, then released before its tiny twin."""
    data = _read(name)
    parent = data["tiny_of"] or name
    pub = _read(parent)["published_params"]
    return (data["generation"], pub["total"], data["tiny_of"] is not None, name)


def broken() -> dict[str, str]:
    """Config files that cannot be read (name -> the one-line reason); :func:`names` leaves them out."""
    out = {}
    for name in sorted(_all_names()):
        try:
            _order(name)
        except (ConfigError, KeyError, TypeError) as exc:
            out[name] = str(exc) if isinstance(exc, ConfigError) else f"{name}.json: {type(exc).__name__}: {exc}"
    return out


def names(tiny: bool | None = None, core: bool | None = True) -> list[str]:
    """Readable config names in generation / size order; ``tiny=True`` only the twins, ``False`` only
    released; ``core=True`` (the default) only the text decoders of Gemma 1-4, ``False`` only the
    image-text models and Gemma 3n, ``None`` all. A malformed file is left out (see :func:`broken`), so
    one bad file does not hide the rest."""
    bad = broken()
    out = sorted((n for n in _all_names() if n not in bad), key=_order)
    if core is not None:
        out = [n for n in out if (_read(n)["hf_config"].get("model_type") not in _BEYOND_CORE) == core]
    if tiny is None:
        return out
    return [n for n in out if (_read(n)["tiny_of"] is not None) == tiny]


def load(name: str) -> dict[str, Any]:
    """The whole config file as a dict (a fresh deep copy). Unknown names raise ``KeyError``."""
    available = sorted(_all_names())
    if name not in available:
        close = difflib.get_close_matches(str(name), available, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise KeyError(f"unknown config {name!r}; {hint}available: {', '.join(available)}")
    return copy.deepcopy(_read(name))


def hf_config(name: str) -> dict[str, Any]:
    """A deep copy of the variant's HF ``config.json`` dict (an image-text model's with its text config
    filled in)."""
    config = load(name)["hf_config"]
    if isinstance(config.get("text_config"), str):
        config["text_config"] = hf_config(config["text_config"])
    return config


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The text decoder's part of an HF config dict (itself for a text model)."""
    return config["text_config"] if isinstance(config.get("text_config"), dict) else config


def cut(config: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """The config cut to its first ``num_layers`` layers (a full-size model that does not fit, gated in
    part). Layer types are cut with it; Gemma 4's KV-shared tail keeps the layers of it that remain
    (they read the same donors, which come before it). An image-text model's text decoder is cut."""
    if isinstance(config.get("text_config"), dict):
        return {**copy.deepcopy(config), "text_config": cut(config["text_config"], num_layers)}
    total = config["num_hidden_layers"]
    if not isinstance(num_layers, int) or not 1 <= num_layers <= total:
        raise ValueError(f"cannot cut a {total}-layer model to {num_layers!r} layers (1 to {total})")
    out = copy.deepcopy(config)
    out["num_hidden_layers"] = num_layers
    if isinstance(out.get("layer_types"), list):
        out["layer_types"] = out["layer_types"][:num_layers]
    shared = out.get("num_kv_shared_layers") or 0
    if shared:
        out["num_kv_shared_layers"] = max(0, num_layers - (total - shared))
    return out
