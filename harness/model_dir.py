"""A tiny model as an HF checkpoint directory on disk, for implementations that load from a path (vLLM).

The directory holds ``config.json``, ``model.safetensors`` (the HF-named state dict) and a tokenizer
made here, offline and deterministically: a word-level vocabulary ``<pad>``, ``<eos>``, ``<bos>`` at
the ids the config names, every other id ``<t{id}>``, split on whitespace. Token ids go in and out of
the implementation directly; the tokenizer exists because servers insist on loading one, and it
round-trips every id (``decode(encode(x)) == x``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

if TYPE_CHECKING:
    from tokenizers import Tokenizer

CAUSAL_LM = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
             "gemma4_text": "Gemma4ForCausalLM"}  # model_type -> the class a checkpoint names
SPECIAL = {"pad_token_id": "<pad>", "eos_token_id": "<eos>", "bos_token_id": "<bos>"}
_DEFAULT_IDS = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}


def special_ids(hf_config: Mapping) -> dict[str, int]:
    """The pad/eos/bos ids of a config (first id where the config lists several), defaults 0/1/2."""
    out = {}
    for key, default in _DEFAULT_IDS.items():
        value = hf_config.get(key, default)
        value = value[0] if isinstance(value, list) else value
        out[key] = default if value is None else int(value)
    return out


def vocabulary(hf_config: Mapping) -> dict[str, int]:
    """token -> id for every id below vocab_size."""
    ids = special_ids(hf_config)
    names = {i: SPECIAL[key] for key, i in ids.items()}
    return {names.get(i, f"<t{i}>"): i for i in range(int(hf_config["vocab_size"]))}


def build_tokenizer(hf_config: Mapping) -> Tokenizer:
    """A ``tokenizers`` WordLevel tokenizer over :func:`vocabulary`, split on whitespace, unknown words -> ``<pad>``;
    pad/eos/bos are special tokens. No decoder: ids decode to their tokens joined by spaces."""
    try:
        from tokenizers import AddedToken, Tokenizer
        from tokenizers.models import WordLevel
        from tokenizers.pre_tokenizers import WhitespaceSplit
    except ImportError as exc:
        raise ImportError(
            "the model directory's tokenizer is built with `tokenizers`: pip install 'tokenizers>=0.19'") from exc
    tok = Tokenizer(WordLevel(vocabulary(hf_config), unk_token=SPECIAL["pad_token_id"]))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens([AddedToken(SPECIAL[key], special=True, normalized=False)
                            for key in ("pad_token_id", "eos_token_id", "bos_token_id")])
    return tok


def write_tokenizer(path: Path, hf_config: Mapping) -> None:
    ids = special_ids(hf_config)
    build_tokenizer(hf_config).save(str(path / "tokenizer.json"))
    tokens = {key.replace("_id", ""): SPECIAL[key] for key in ids}
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": int(hf_config.get("max_position_embeddings", 8192)),
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False, **tokens,
    }, indent=1))
    (path / "special_tokens_map.json").write_text(json.dumps(tokens, indent=1))


def write_model_dir(path: str | Path, hf_config: Mapping, state_dict: Mapping[str, torch.Tensor],
                    dtype: torch.dtype = torch.float32) -> Path:
    """Write an HF checkpoint directory of `state_dict` (stored in `dtype`) with its tokenizer."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = dict(hf_config)
    if not config.get("architectures") and config.get("model_type") in CAUSAL_LM:
        config["architectures"] = [CAUSAL_LM[config["model_type"]]]  # loaders pick the model class by it
    config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(config, indent=1))
    save_file({name: t.detach().to(dtype).contiguous() for name, t in state_dict.items()},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer(path, hf_config["text_config"] if isinstance(hf_config.get("text_config"), Mapping) else hf_config)
    return path


NEWLINES = ("\n", "\n\n", "\n\n\n", "\n\n\n\n")


def write_processor_config(path: str | Path, hf_config: Mapping) -> None:
    """An image-text model's processor files beside its checkpoint (nothing for other models), for servers
    that run HF's processor on the images (vLLM).

    Gemma 3 (``gemma3``): ``processor_config.json`` (``image_seq_length`` = the twin's soft tokens per
    image) and ``preprocessor_config.json`` for HF's ``Gemma3ImageProcessorPil`` at the twin's image size,
    with resize, rescale and normalisation off: the harness's images are already the processor's output
    ((3, S, S) in [-1, 1]), so they pass through unchanged. The tokenizer gains what the processor and
    vLLM's Gemma 3 processing read: ``boi_token`` / ``eoi_token`` / ``image_token`` (the config's ids, as
    special tokens) and the newline tokens ``\n`` .. ``\n\n\n\n`` at ids past the model's vocabulary
    (never produced: the tokenizer splits on whitespace), so the image replacement it builds,
    ``\n\n<boi><image>*N<eoi>\n\n``, encodes to exactly ``<boi> <image>*N <eoi>``."""
    path = Path(path)
    if hf_config.get("model_type") != "gemma3" or not isinstance(hf_config.get("vision_config"), Mapping):
        return
    text, vision = hf_config["text_config"], hf_config["vision_config"]
    size = int(vision["image_size"])
    (path / "processor_config.json").write_text(json.dumps(
        {"processor_class": "Gemma3Processor", "image_seq_length": int(hf_config["mm_tokens_per_image"])}, indent=1))
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Gemma3ImageProcessorPil", "processor_class": "Gemma3Processor",
        "size": {"height": size, "width": size}, "do_resize": False, "do_rescale": False, "do_normalize": False,
        "do_convert_rgb": False, "do_pan_and_scan": False, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
        "resample": 2}, indent=1))
    tokens = {"boi_token": hf_config["boi_token_index"], "eoi_token": hf_config["eoi_token_index"],
              "image_token": hf_config["image_token_index"]}
    vocab = {i: token for token, i in vocabulary(text).items()}
    tokenizer = json.loads((path / "tokenizer.json").read_text())
    for k, newline in enumerate(NEWLINES):
        tokenizer["model"]["vocab"][newline] = int(text["vocab_size"]) + k
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    tokenizer_config["extra_special_tokens"] = {key: vocab[int(i)] for key, i in tokens.items()}
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
