"""hypothesis strategies for valid tiny Gemma configs (every generation and Gemma 4 shape) and inputs.

Every draw is valid by construction — query heads are drawn as KV heads × group size, a Gemma 4
model's KV-shared tail is sized so every shared layer has an earlier donor of its type, top-k never
exceeds the expert count — so nothing is filtered away.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from harness.synthetic import Batch

VOCAB = 256
SLIDING, FULL = "sliding_attention", "full_attention"


@st.composite
def _heads(draw, max_heads: int = 8) -> tuple[int, int]:
    """(query heads, KV heads): MQA, GQA or MHA."""
    kv = draw(st.sampled_from([1, 2, 4]))
    groups = draw(st.sampled_from([g for g in (1, 2, 4) if kv * g <= max_heads]))
    return kv * groups, kv


def _common(draw, heads: tuple[int, int], layers: int) -> dict:
    n_heads, n_kv = heads
    return {
        "vocab_size": VOCAB, "hidden_size": draw(st.sampled_from([32, 48, 64])),
        "intermediate_size": draw(st.sampled_from([64, 96, 128])), "num_hidden_layers": layers,
        "num_attention_heads": n_heads, "num_key_value_heads": n_kv, "head_dim": draw(st.sampled_from([8, 16])),
        "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "attention_bias": False,
    }


@st.composite
def gemma1(draw) -> dict:
    cfg = _common(draw, draw(_heads()), draw(st.integers(1, 4)))
    return {"model_type": "gemma", **cfg, "hidden_act": "gelu_pytorch_tanh",
            "rope_parameters": {"rope_type": "default", "rope_theta": draw(st.sampled_from([1e4, 1e5]))}}


def _layer_types(draw, n: int, all_sliding: bool = False, windowed: bool = False) -> list[str]:
    """n layer types; ``windowed``: at least one sliding layer (so a window property can bite)."""
    if all_sliding:
        return [SLIDING] * n
    types = draw(st.lists(st.sampled_from([SLIDING, FULL]), min_size=n, max_size=n))
    if windowed and n and SLIDING not in types:
        types[draw(st.integers(0, n - 1))] = SLIDING
    return types


@st.composite
def gemma2(draw, all_sliding: bool = False, windowed: bool = False) -> dict:
    n = draw(st.integers(1, 5))
    cfg = _common(draw, draw(_heads()), n)
    return {"model_type": "gemma2", **cfg, "hidden_activation": "gelu_pytorch_tanh",
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e4},
            "query_pre_attn_scalar": draw(st.sampled_from([cfg["head_dim"], int(cfg["head_dim"] * 1.125) + 1, 24])),
            "attn_logit_softcapping": draw(st.sampled_from([None, 20.0, 50.0])),
            "final_logit_softcapping": draw(st.sampled_from([None, 30.0])),
            "sliding_window": draw(st.integers(2, 12)), "layer_types": _layer_types(draw, n, all_sliding, windowed)}


@st.composite
def gemma3(draw, all_sliding: bool = False, windowed: bool = False) -> dict:
    n = draw(st.integers(1, 7))
    cfg = _common(draw, draw(_heads()), n)
    full = {"rope_type": "default", "rope_theta": 1e6}
    if draw(st.booleans()):
        full = {"rope_type": "linear", "factor": draw(st.sampled_from([2.0, 8.0])), "rope_theta": 1e6}
    return {"model_type": "gemma3_text", **cfg, "hidden_activation": "gelu_pytorch_tanh",
            "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4}, "full_attention": full},
            "query_pre_attn_scalar": draw(st.sampled_from([cfg["head_dim"], 24])),
            "final_logit_softcapping": draw(st.sampled_from([None, 30.0])),
            "sliding_window": draw(st.integers(2, 12)), "layer_types": _layer_types(draw, n, all_sliding, windowed),
            "use_bidirectional_attention": False}


@st.composite
def gemma4(draw, shape: str | None = None, windowed: bool = False) -> dict:
    """One of the Gemma 4 shapes: dense (31B-like, K=V), moe (26B-A4B-like), edge (E2B/E4B-like: PLE,
    KV-shared tail, maybe double-wide MLP)."""
    shape = shape or draw(st.sampled_from(["dense", "moe", "edge"]))
    n = draw(st.integers(2, 7))
    n_heads, n_kv = draw(_heads())
    types = _layer_types(draw, n - 1, windowed=windowed) + [FULL]  # HF forces the last layer global
    cfg = _common(draw, (n_heads, n_kv), n)
    cfg |= {"model_type": "gemma4_text", "hidden_activation": "gelu_pytorch_tanh", "layer_types": types,
            "global_head_dim": draw(st.sampled_from([16, 32])), "sliding_window": draw(st.integers(2, 12)),
            "final_logit_softcapping": draw(st.sampled_from([None, 30.0])),
            "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                                   "rope_theta": 1e6}},
            "attention_k_eq_v": False, "num_global_key_value_heads": None, "enable_moe_block": False,
            "hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": VOCAB, "num_kv_shared_layers": 0,
            "use_double_wide_mlp": False}
    if shape in ("dense", "moe") and draw(st.booleans()):
        cfg |= {"attention_k_eq_v": True,
                "num_global_key_value_heads": draw(st.sampled_from([k for k in (1, 2, 4) if n_heads % k == 0]))}
    if shape == "moe":
        experts = draw(st.integers(2, 8))
        cfg |= {"enable_moe_block": True, "num_experts": experts, "top_k_experts": draw(st.integers(1, min(experts, 4))),
                "moe_intermediate_size": draw(st.sampled_from([8, 16]))}
    if shape == "edge":
        cfg |= {"hidden_size_per_layer_input": draw(st.sampled_from([4, 8])),
                "num_kv_shared_layers": draw(st.integers(0, _max_shared(types))),
                "use_double_wide_mlp": draw(st.booleans())}
    return cfg


def _max_shared(types: list[str]) -> int:
    """The longest tail whose every layer has an earlier, non-shared layer of its own type (HF Gemma 3n's
    ``kv_sharing_modes`` rule too: the unshared head must hold every layer type of the model)."""
    best = 0
    for shared in range(1, len(types)):
        head, tail = types[: len(types) - shared], types[len(types) - shared:]
        if all(t in head for t in tail):
            best = shared
    return best


def _gemma3n_types(draw, n: int, all_sliding: bool = False) -> list[str]:
    """A 4:1-ish pattern: one full layer every ``period`` layers (5: the released pattern) from a drawn phase,
    maybe one layer flipped; always at least one full and one sliding layer (n >= 5 > period - 1)."""
    if all_sliding:
        return [SLIDING] * n
    period = draw(st.sampled_from([2, 3, 4, 5]))
    phase = draw(st.integers(0, period - 1))
    types = [FULL if i % period == phase else SLIDING for i in range(n)]
    if draw(st.booleans()):
        i = draw(st.integers(0, n - 1))
        types[i] = SLIDING if types[i] == FULL else FULL
    if FULL not in types:
        types[draw(st.integers(0, n - 1))] = FULL
    if SLIDING not in types:
        types[draw(st.integers(0, n - 1))] = SLIDING
    return types


@st.composite
def gemma3n(draw, all_sliding: bool = False, windowed: bool = False) -> dict:
    """A Gemma 3n text decoder (HF ``gemma3n_text``): AltUp (2-4 streams, any active stream), LAuReL, activation
    sparsity on some layers, PLE (its vocabulary maybe smaller than the model's: ids past it read row 0), a
    per-layer MLP width, a KV-shared tail as long as HF's sharing rule allows. ``windowed`` needs nothing:
    every drawn pattern has a sliding layer."""
    n = draw(st.integers(5, 10))
    cfg = _common(draw, draw(_heads()), n)
    types = _gemma3n_types(draw, n, all_sliding)
    sparsity = draw(st.lists(st.sampled_from([0.0, 0.0, 0.5, 0.95]), min_size=n, max_size=n))
    if not any(sparsity):
        sparsity[draw(st.integers(0, n - 1))] = draw(st.sampled_from([0.5, 0.95]))
    inputs = draw(st.integers(2, 4))
    return {"model_type": "gemma3n_text", **cfg, "hidden_activation": "gelu_pytorch_tanh",
            "intermediate_size": draw(st.lists(st.sampled_from([32, 64, 96]), min_size=n, max_size=n)),
            "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                "full_attention": {"rope_type": "default", "rope_theta": 1e6}},
            "final_logit_softcapping": draw(st.sampled_from([10.0, 30.0])),  # HF 3n takes no None
            "sliding_window": draw(st.integers(2, 12)), "layer_types": types,
            "num_kv_shared_layers": draw(st.integers(0, _max_shared(types))),
            "hidden_size_per_layer_input": draw(st.sampled_from([4, 8])),
            "vocab_size_per_layer_input": draw(st.sampled_from([128, 200, VOCAB])),
            "activation_sparsity_pattern": sparsity, "altup_num_inputs": inputs,
            "altup_active_idx": draw(st.integers(0, inputs - 1)), "altup_coef_clip": 120.0,
            "altup_correct_scale": draw(st.booleans()), "laurel_rank": draw(st.sampled_from([2, 4, 8]))}


_BY_FAMILY = {"gemma": gemma1, "gemma2": gemma2, "gemma3_text": gemma3, "gemma4_text": gemma4, "gemma3n_text": gemma3n}
FAMILIES = tuple(_BY_FAMILY)


WINDOWED = ("gemma2", "gemma3_text", "gemma4_text", "gemma3n_text")  # the generations with sliding layers
ALL_SLIDING = ("gemma2", "gemma3_text", "gemma3n_text")  # those that can have no global layer (Gemma 4's last is)


def any_config(families=FAMILIES, windowed: bool = False) -> st.SearchStrategy[dict]:
    """Configs of the given HF model types (all generations by default). ``windowed``: every config
    has a sliding layer (Gemma 1, which has none, is drawn only if it is the only family asked for)."""
    if not windowed:
        return st.one_of(*(_BY_FAMILY[f]() for f in families))
    with_windows = [f for f in families if f in WINDOWED]
    if not with_windows:
        return st.one_of(*(_BY_FAMILY[f]() for f in families))
    return st.one_of(*(_BY_FAMILY[f](windowed=True) for f in with_windows))


def all_sliding_config(families=FAMILIES) -> st.SearchStrategy[dict]:
    """Configs whose every layer is sliding (Gemma 2, 3 and 3n only: Gemma 4's last layer is always global)."""
    options = [_BY_FAMILY[f](all_sliding=True) for f in families if f in ALL_SLIDING]
    return st.one_of(*options) if options else st.nothing()


@st.composite
def batches(draw, config: dict, max_factor: int = 3, min_length: int = 1, padding: bool = True,
            past_window: bool = False) -> Batch:
    """Two rows: lengths `min_length` to >= 3x the window, the second row left-padded (unless ``padding``
    is False: for a port without padding), ids over the whole vocabulary (the first real token of each
    row is BOS). ``past_window``: rows longer than the window, so a window or cache-wrap bug can show."""
    window = config.get("sliding_window") or 8
    if past_window:
        min_length = max(min_length, window + 1)
    length = draw(st.integers(min_length, max(min_length, max_factor * window + 2)))
    pad = draw(st.integers(0, length - 1)) if padding else 0
    ids = torch.tensor(draw(st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=length, max_size=length),
                                     min_size=2, max_size=2)))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    ids[0, 0], ids[1, pad] = 2, 2
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return Batch(ids, mask, positions)


def bites_the_window(config: dict, batch: Batch) -> bool:
    """Whether a drawn case can exercise a sliding window: a sliding layer and a row longer than it."""
    longest = int(batch.attention_mask.sum(dim=1).max())
    return SLIDING in (config.get("layer_types") or []) and longest > (config.get("sliding_window") or 0)


# --------------------------------------------------------------------------------------------------
# Image-text models: a drawn text decoder, a drawn tower (and audio tower), media placed at drawn
# positions. Placeholder ids sit at the top of the vocabulary; text ids are drawn below them.

G3_IDS = {"image_token_index": 255, "boi_token_index": 253, "eoi_token_index": 254}
G4_IDS = {"image_token_id": 250, "audio_token_id": 251, "video_token_id": 252, "boi_token_id": 253,
          "eoi_token_id": 254, "boa_token_id": 255, "eoa_token_index": 249}
TEXT_IDS = 249  # text tokens are drawn from [0, 249): never a placeholder or a media delimiter
MULTIMODAL_FAMILIES = ("gemma3", "gemma4", "gemma3n")


@st.composite
def gemma3_multimodal(draw) -> dict:
    """A Gemma 3 image-text config: a drawn Gemma 3 decoder and SigLIP tower; the pooling kernel divides
    the patch grid (e.g. 8 patches a side pooled to 2, 4 or 8 tokens a side)."""
    text = draw(gemma3())
    heads = draw(st.sampled_from([1, 2, 4]))
    side = draw(st.sampled_from([4, 6, 8]))
    per_side = draw(st.sampled_from([d for d in range(1, side + 1) if side % d == 0]))
    patch = draw(st.sampled_from([2, 4]))
    vision = {"model_type": "siglip_vision_model", "hidden_size": 8 * heads * draw(st.sampled_from([1, 2])),
              "intermediate_size": draw(st.sampled_from([16, 32])), "num_hidden_layers": draw(st.integers(1, 2)),
              "num_attention_heads": heads, "image_size": side * patch, "patch_size": patch,
              "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh", "vision_use_head": False}
    return {"model_type": "gemma3", "text_config": text, "vision_config": vision,
            "mm_tokens_per_image": per_side**2, **G3_IDS}


@st.composite
def gemma4_multimodal(draw) -> dict:
    """A Gemma 4 image(-audio)-text config: a drawn Gemma 4 decoder (maybe bidirectional images), a vision
    tower (clipped or standardised), and maybe an audio tower."""
    text = draw(gemma4()) | {"use_bidirectional_attention": draw(st.sampled_from([None, "vision"]))}
    heads = draw(st.sampled_from([1, 2]))
    clipped = draw(st.booleans())
    vision = {"model_type": "gemma4_vision", "hidden_size": 16 * heads, "intermediate_size": draw(st.sampled_from([32, 48])),
              "num_hidden_layers": draw(st.integers(1, 2)), "num_attention_heads": heads, "num_key_value_heads": heads,
              "head_dim": draw(st.sampled_from([8, 16])), "patch_size": 4, "pooling_kernel_size": 3,
              "position_embedding_size": 64, "use_clipped_linears": clipped, "standardize": not clipped and draw(st.booleans()),
              "rope_parameters": {"rope_type": "default", "rope_theta": 100.0}}
    audio = None
    if draw(st.booleans()):
        audio = {"model_type": "gemma4_audio", "hidden_size": draw(st.sampled_from([16, 32])), "num_hidden_layers": 1,
                 "num_attention_heads": 2, "subsampling_conv_channels": [128, 4], "output_proj_dims": 24,
                 "gradient_clipping": 1.5, "attention_logit_cap": 4.0, "use_clipped_linears": True}
    return {"model_type": "gemma4", "text_config": text, "vision_config": vision, "audio_config": audio, **G4_IDS}


@st.composite
def gemma3n_multimodal(draw) -> dict:
    """A Gemma 3n image-audio-text config (HF ``gemma3n``), its vocabulary laid out as the tiny twin's: text ids,
    then <boi> and <boa> (text-table tokens), then the hard vision ids (<eoi> at the offset, the image placeholder
    among them), then the hard audio ids (<eoa> at the offset, the audio placeholder among them) up to the
    vocabulary's end (HF pads a clip with the embedding of the last id). A drawn Gemma 3n decoder, the full-depth
    MobileNet-V5 at a small channel multiplier with a 2-4 cells a side output grid, a small audio tower."""
    text = draw(gemma3n())
    side = draw(st.integers(2, 4))
    vision_vocab, audio_vocab = draw(st.sampled_from([8, 16, 32])), draw(st.sampled_from([8, 16, 32]))
    audio_offset = VOCAB - audio_vocab
    vision_offset = audio_offset - vision_vocab
    vision = {"model_type": "gemma3n_vision", "architecture": "mobilenetv5_300m_enc", "hidden_size": 2048,
              "vocab_size": vision_vocab, "vocab_offset": vision_offset, "rms_norm_eps": 1e-6, "do_pooling": False,
              "model_args": {"channel_multiplier": draw(st.sampled_from([0.0625, 0.125])),
                             "msfa_output_resolution": side}}
    audio = {"model_type": "gemma3n_audio", "vocab_size": audio_vocab, "vocab_offset": audio_offset,
             "input_feat_size": 128, "hidden_size": draw(st.sampled_from([16, 32])), "rms_norm_eps": 1e-6,
             "gradient_clipping": 1.5, "conf_attention_chunk_size": 12, "conf_attention_context_left": 13,
             "conf_attention_context_right": 0, "conf_attention_logit_cap": 4.0,
             "conf_num_attention_heads": draw(st.sampled_from([2, 4])), "conf_num_hidden_layers": draw(st.integers(1, 2)),
             "conf_conv_kernel_size": 5, "conf_reduction_factor": 4, "conf_residual_weight": 0.5,
             "sscp_conv_channel_size": [8, 4], "sscp_conv_group_norm_eps": 1e-3,
             "sscp_conv_kernel_size": [[3, 3], [3, 3]], "sscp_conv_stride_size": [[2, 2], [2, 2]]}
    return {"model_type": "gemma3n", "text_config": text, "vision_config": vision, "audio_config": audio,
            "vision_soft_tokens_per_image": side**2, "audio_soft_tokens_per_image": draw(st.integers(2, 5)),
            "boi_token_id": vision_offset - 2, "boa_token_id": vision_offset - 1,
            "eoi_token_id": vision_offset, "image_token_id": vision_offset + draw(st.integers(1, vision_vocab - 1)),
            "eoa_token_id": audio_offset, "audio_token_id": audio_offset + draw(st.integers(1, audio_vocab - 1)),
            "tie_word_embeddings": True}


_MULTIMODAL = {"gemma3": gemma3_multimodal, "gemma4": gemma4_multimodal, "gemma3n": gemma3n_multimodal}


def multimodal_config(families=MULTIMODAL_FAMILIES) -> st.SearchStrategy[dict]:
    return st.one_of(*(_MULTIMODAL[f]() for f in families if f in _MULTIMODAL))


G4_IMAGE_SIZES = ((24, 36), (36, 36), (48, 20), (60, 28))


def text_ids_below(config: dict) -> int:
    """Text ids are drawn below this: never a placeholder, a media delimiter or (Gemma 3n) a hard media id."""
    if config["model_type"] == "gemma3n":
        return min(config["boi_token_id"], config["boa_token_id"])
    return TEXT_IDS


def gemma3n_clip_tokens(samples: int, audio_config: dict) -> int:
    """The audio tower's output frames for clips of at most ``samples`` samples batched by HF's Gemma 3n feature
    extractor (defaults: 512-sample frames every 160 samples, the waveform right-padded to a multiple of 128),
    after the tower's strided convolutions (ceil(T / stride) each) and its reduction (every r-th frame)."""
    padded = -(-samples // 128) * 128
    return _gemma3n_tower_frames(max((padded - 513) // 160 + 1, 0), audio_config)


def _gemma3n_tower_frames(frames: int, audio_config: dict) -> int:
    """Log-mel frames -> the audio tower's output frames."""
    for stride, _ in audio_config["sscp_conv_stride_size"]:
        frames = -(-frames // stride)
    return -(-frames // audio_config["conf_reduction_factor"])


def _gemma3n_longest_clip(audio_config: dict, tokens: int) -> int:
    """The most samples a clip may have for the batch's frames to fit in ``tokens`` placeholders."""
    samples = 1000
    while gemma3n_clip_tokens(samples + 100, audio_config) <= tokens:
        samples += 100
    return samples


@st.composite
def media_batches(draw, config: dict, padding: bool = True) -> Batch:
    """Two rows, each with 0-2 images (Gemma 3: the tower's size; Gemma 4: drawn sizes at budget 70, patches
    as HF's processor makes them; Gemma 3n: 48 px per output cell a side, in [0, 1]) and, on audio models, 0-1
    clips of drawn length (Gemma 3n: short enough that the batch's frames fit the placeholders, every clip
    ``audio_soft_tokens_per_image`` of them), at drawn places between drawn text; at least one image in the
    batch. Row 1 maybe left-padded."""
    from harness.synthetic import GEMMA4_BUDGET, gemma3n_image_size, make_image, make_waveform
    from reference_impl.spec import ModelSpec

    spec = ModelSpec.from_hf_config(config)
    mm = spec.multimodal
    gemma4, gemma3n = config["model_type"] == "gemma4", config["model_type"] == "gemma3n"
    longest = _gemma3n_longest_clip(mm.audio_config, mm.audio_tokens) if gemma3n else 9000
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    rows, images, clips = [], [], []
    for row in range(2):
        runs = [("text", draw(st.integers(0, 6)))]
        for _ in range(draw(st.integers(1 if row == 0 else 0, 2))):
            if gemma4:
                h, w = draw(st.sampled_from(G4_IMAGE_SIZES))
                images.append(((make_image(h, gen, w) + 1) / 2, row))
            elif gemma3n:
                images.append(((make_image(gemma3n_image_size(spec), gen) + 1) / 2, row))
            else:
                images.append((make_image(mm.vision.image_size, gen), row))
            runs += [("image", len(images) - 1), ("text", draw(st.integers(0, 5)))]
        if (gemma4 or gemma3n) and mm.audio_config is not None and draw(st.booleans()):
            clips.append((make_waveform(draw(st.integers(min(2000, longest), longest)), gen), row))
            runs += [("audio", len(clips) - 1), ("text", draw(st.integers(0, 4)))]
        rows.append(runs)
    media: dict = {}
    if gemma3n:
        from reference_impl import audio

        media["pixel_values"] = torch.stack([im for im, _ in images])
        counts, clip_counts = [mm.vision_tokens] * len(images), [mm.audio_tokens] * len(clips)
        if clips:
            features, frames = audio.batch_features_3n([w.numpy() for w, _ in clips])
            out = _gemma3n_tower_frames(features.shape[1], mm.audio_config)
            assert out <= mm.audio_tokens, f"{out} audio frames for {mm.audio_tokens} placeholders ({features.shape})"
            media |= {"audio_features": features, "audio_mask": frames, "audio_rows": torch.tensor([r for _, r in clips])}
        wrap = {"image": (mm.boi_token_id, mm.image_token_id, mm.eoi_token_id),
                "audio": (mm.boa_token_id, mm.audio_token_id, mm.eoa_token_id)}
    elif gemma4:
        from reference_impl import audio, gemma4_vision

        pixels, positions, counts = gemma4_vision.images_to_batch([im for im, _ in images], GEMMA4_BUDGET, mm.vision_config)
        media |= {"pixel_values": pixels, "image_position_ids": positions}
        clip_counts = [audio.soft_token_count(len(w)) for w, _ in clips]
        if clips:
            features, frames = audio.batch_features([audio.log_mel_features(w.numpy()) for w, _ in clips])
            media |= {"audio_features": features, "audio_mask": frames, "audio_rows": torch.tensor([r for _, r in clips])}
        wrap = {"image": (mm.boi_token_id, mm.image_token_id, mm.eoi_token_id),
                "audio": (mm.boa_token_id, mm.audio_token_id, mm.eoa_token_id)}
    else:
        media["pixel_values"] = torch.stack([im for im, _ in images])
        counts, clip_counts = [mm.tokens_per_image] * len(images), []
        wrap = {"image": (mm.boi_token_id, mm.image_token_id, mm.eoi_token_id)}
    media["image_rows"] = torch.tensor([r for _, r in images])
    sequences = []
    for runs in rows:
        ids = [spec.bos_token_id]
        for kind, n in runs:
            if kind == "text":
                ids += draw(st.lists(st.integers(3, text_ids_below(config) - 1), min_size=n, max_size=n))
                continue
            begin, token, end = wrap[kind]
            ids += [begin] + [token] * (counts[n] if kind == "image" else clip_counts[n]) + [end]
        sequences.append(ids)
    pad = draw(st.integers(0, 3)) if padding else 0
    length = max(len(sequences[0]), len(sequences[1]) + pad)
    ids = torch.zeros(2, length, dtype=torch.long)
    mask = torch.zeros(2, length, dtype=torch.long)
    for row, seq in enumerate(sequences):  # left-padded to the common length
        ids[row, length - len(seq):], mask[row, length - len(seq):] = torch.tensor(seq), 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return Batch(ids, mask, positions, **media)
