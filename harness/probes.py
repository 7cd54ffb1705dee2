"""Canonical probe points, in forward order, and what lies between them.

Each sublayer has two probes: what it reads (``*_input``) and what it returns. The gate judges an
input against the reference's stream and the sublayer on the candidate's own input, so the first
failing probe names the first wrong *operation*: a failing ``layers.0.mlp_input`` means the bug lies
between ``layers.0.attn`` and the MLP (the post-attention norm, the residual add or the pre-MLP norm);
a failing ``layers.0.mlp`` with its input right means the MLP itself computes wrongly.
"""

from __future__ import annotations

import re

from reference_impl.spec import Gemma3nMediaSpec, Gemma4MediaSpec

_LAYER_PROBE = re.compile(r"^layers\.(\d+)\.(\w+)$")

# sublayer kind -> (what it is, what is inside it: where a bug is when it computes wrongly on the right input)
SUBLAYERS = {
    "attn": ("the attention", "its q/k/v projections, QK/V norms, RoPE, score scale, softcap, mask, softmax or "
                              "output projection"),
    "mlp": ("the MLP", "its gate/up projections, GELU or down projection"),
    "router": ("the router", "its input norm and scale, projection, softmax, top-k, renormalisation or "
                             "per-expert scale"),
    "moe": ("the experts", "the per-expert GeGLU, the weighting by the dispatch weights or the sum"),
    "ple": ("the per-layer projection", "the projection back to the hidden size"),
    "final_norm": ("the final norm", "the RMSNorm itself (its offset, eps or dtype)"),
}


def canonical(num_layers: int) -> list[str]:
    """Gemma 1-3: embed, then per layer attn_input / attn / mlp_input / mlp / out, then final_norm_input,
    final_norm and logits."""
    names = ["embed"]
    for i in range(num_layers):
        names += [f"layers.{i}.{sub}" for sub in ("attn_input", "attn", "mlp_input", "mlp", "out")]
    return names + ["final_norm_input", "final_norm", "logits"]


def vision(spec) -> list[str]:
    """An image-text model's media paths (image, then audio on Gemma 4 E2B/E4B), in order; each probe is
    (items, tokens, features)."""
    mm = getattr(spec, "multimodal", None)
    if mm is None:
        return []
    if isinstance(mm, Gemma4MediaSpec):
        from reference_impl.media import probe_names

        return probe_names(mm)
    if isinstance(mm, Gemma3nMediaSpec):
        from reference_impl.media3n import probe_names as probe_names_3n

        return probe_names_3n(mm)
    layers = [f"vision.layers.{i}.out" for i in range(mm.vision.num_layers)]
    return ["vision.embed", *layers, "vision.post_norm", "vision.pool", "vision.proj"]


def is_media(name: str) -> bool:
    """A probe of an image (or audio) tower: shaped (items, tokens, ...), not (batch, tokens, ...)."""
    return name.startswith(("vision.", "audio."))


def for_spec(spec) -> list[str]:
    """Every probe of a model, in forward order: an image-text model's image path and the ``merge`` of its
    soft tokens into the embedded text; per layer the attention and the MLP (each input, then output), on
    MoE layers the router and the experts, on per-layer-embedding models the PLE branch, then the layer's
    output stream. Gemma 3n's own probes: :mod:`harness.gemma3n_probes`."""
    if getattr(spec, "gemma3n", None) is not None:
        from . import gemma3n_probes

        return gemma3n_probes.for_spec(spec)
    names = [*vision(spec), "embed"] + (["merge"] if getattr(spec, "multimodal", None) is not None else [])
    for layer in spec.layers:
        p = f"layers.{layer.index}"
        names += [f"{p}.attn_input", f"{p}.attn", f"{p}.mlp_input", f"{p}.mlp"]
        if layer.moe is not None:
            names += [f"{p}.router_input", f"{p}.router", f"{p}.moe_input", f"{p}.moe"]
        if spec.ple is not None:
            names += [f"{p}.ple_input", f"{p}.ple"]
        names.append(f"{p}.out")
    return names + ["final_norm_input", "final_norm", "logits"]


def locate(name: str) -> tuple[int | None, str]:
    """'layers.3.mlp' -> (3, 'mlp'); 'embed' -> (None, 'embed')."""
    match = _LAYER_PROBE.match(name)
    if match:
        return int(match.group(1)), match.group(2)
    return None, name


def input_of(name: str) -> str | None:
    """The probe holding what sublayer ``name`` reads (``layers.0.mlp`` -> ``layers.0.mlp_input``), or None."""
    kind = locate(name)[1]
    return name + "_input" if kind in SUBLAYERS else None


STREAM = ("attn_input", "mlp_input", "router_input", "moe_input", "ple_input", "out")  # + final_norm_input


def upstream_values(spec, name: str) -> list[str] | None:
    """The probes a stream probe is computed from (the reference recomputes it from the candidate's own
    values of these, so the operations between them are judged alone), or None for other probes. On the
    image path each probe is computed from the one before it."""
    if getattr(spec, "gemma3n", None) is not None and not (is_media(name) or name == "merge"):
        from . import gemma3n_probes

        return gemma3n_probes.upstream_values(spec, name)
    path = vision(spec)
    if name == "vision.pool" and isinstance(spec.multimodal, Gemma3nMediaSpec):  # the fusion reads two blocks
        from reference_impl.media3n import tower_blocks

        return [f"vision.layers.{i}.out" for i in tower_blocks(spec.multimodal)[1]]
    if name in path and name not in ("vision.embed", "audio.embed"):
        return [path[path.index(name) - 1]]
    if name == "merge":
        return ["embed", *(p for p in ("vision.proj", "audio.proj") if p in path)]
    if name == "final_norm_input":
        return [f"layers.{spec.num_layers - 1}.out"]
    layer, kind = locate(name)
    if layer is None or kind not in STREAM:
        return None
    p = f"layers.{layer}"
    first = "merge" if getattr(spec, "multimodal", None) is not None else "embed"
    prev = [first if layer == 0 else f"layers.{layer - 1}.out"]
    if kind == "attn_input":
        return prev
    if kind in ("mlp_input", "router_input", "moe_input"):
        return prev + [f"{p}.attn"]
    branches = [f"{p}.attn", f"{p}.mlp"] + ([f"{p}.moe"] if spec.layers[layer].moe is not None else [])
    if kind == "ple_input":
        return prev + branches + [first]
    return prev + branches + ([f"{p}.ple"] if spec.ple is not None else [])


def _upstream(spec, name: str) -> str:
    """The probe right before the operations that produce ``name`` (an input or a stream probe): the last
    of the values it is computed from (the per-layer input's ``embed`` aside)."""
    if name == "logits":
        return "final_norm"
    if name == "merge":
        return "vision.proj"
    if name == "vision.pool":
        return upstream_values(spec, name)[-1]
    values = upstream_values(spec, name)
    return values[-2] if name.endswith("ple_input") else values[-1]


def _between(spec, name: str) -> str:
    """The operations between the upstream probe and ``name``: where a bug is when ``name`` is wrong
    and everything before it is right."""
    layer, kind = locate(name)
    sandwich = spec.layers[layer].sandwich_norms if layer is not None else False
    post_attn = "the post-attention norm, " if sandwich else ""
    if kind == "attn_input":
        return "the pre-attention norm"
    if kind == "mlp_input":
        return f"{post_attn}the residual add or the pre-MLP norm"
    if kind == "router_input":
        return f"{post_attn}the residual add, or a norm applied to what the router reads: it reads the raw residual"
    if kind == "moe_input":
        return f"{post_attn}the residual add or the experts' pre-norm"
    if kind == "ple_input":
        return ("the post-MLP norm, the residual add, the per-layer input (token table x sqrt(dim), context "
                "projection and its norm, x 1/sqrt(2)) or the per-layer gate")
    if kind == "out":
        return _either(["the post-MLP norm" if sandwich else "", "the residual add",
                        "the post-PLE norm and its add" if spec.ple is not None else "",
                        "the layer scalar" if getattr(spec, "layer_scalar", False) else ""])
    if isinstance(getattr(spec, "multimodal", None), Gemma3nMediaSpec) and (
            name in _GEMMA3N_MEDIA or name.startswith(("vision.layers.", "audio.layers."))):
        return _GEMMA3N_MEDIA.get(name) or _GEMMA3N_MEDIA[name.split(".")[0] + ".layers"]
    gemma4 = isinstance(getattr(spec, "multimodal", None), Gemma4MediaSpec)
    if gemma4 and (name in _GEMMA4_MEDIA or name.startswith(("vision.layers.", "audio.layers."))):
        return _GEMMA4_MEDIA.get(name) or _GEMMA4_MEDIA[name.split(".")[0] + ".layers"]
    if name in _IMAGE_PATH:
        return _IMAGE_PATH[name]
    if name.startswith("vision.layers."):
        return ("the vision encoder layer (its LayerNorms, the attention over every patch — q/k/v/out "
                "projections with biases, scale head_dim^-0.5, no mask — or the fc1/GELU/fc2 MLP, or a residual add)")
    if name == "final_norm_input":
        return "whatever is applied to the stream after the last layer"
    if name == "logits":
        return "the LM head (tied embedding) or the final softcap"
    return "the embedding lookup or its sqrt(hidden) normalizer" if name == "embed" else ""


def _either(parts: list[str]) -> str:
    """'a, b or c' of the non-empty parts."""
    parts = [p for p in parts if p]
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} or {parts[-1]}"


_IMAGE_PATH = {
    "vision.post_norm": "the vision tower's final LayerNorm",
    "vision.pool": "the pooling of the patch grid (k x k average, row-major patches; a norm applied before it "
                   "belongs after it)",
    "vision.proj": "the projector (its soft-embedding RMSNorm with 1 + w, or the projection x @ W with W (vision, text))",
    "merge": "the merge of the soft tokens into the embedded text (at the image-token positions, in order, not "
             "scaled by sqrt(hidden))",
}


_GEMMA4_MEDIA = {
    "vision.layers": "the vision encoder layer (its sandwich norms, q/k norms and scale-free v norm, the 2D RoPE "
                     "— first half of each head by the patch column, second by the row — the clipped linears, the "
                     "padding mask, or the GeGLU MLP)",
    "vision.pool": "the pooling (k x k average by patch position, x sqrt(width) in fp32, padding rows stripped) or the "
                   "standardisation",
    "vision.proj": "embed_vision (the scale-free RMSNorm or the projection to the text width)",
    "audio.layers": "the conformer layer (its macaron feed-forwards x 0.5, the chunked local attention with relative "
                    "positions, its softcap and masks, the light convolution, the clamps or the norms)",
    "audio.out": "the audio tower's output projection (with its bias)",
    "audio.proj": "embed_audio (the scale-free RMSNorm or the projection to the text width)",
    "merge": "the merge of the soft tokens into the embedded text (images at the image tokens, audio at the audio "
             "tokens, in order, not scaled by sqrt(hidden); the placeholders themselves look up the pad embedding)",
}


_GEMMA3N_MEDIA = {
    "vision.layers": "the MobileNet-V5 block (an edge residual, universal inverted residual or multi-query "
                     "attention block: its convolutions and their 'same' padding, RMSNorm2d, GELU, layer scale, "
                     "the attention's key/value downsampling, or the residual add)",
    "vision.pool": "the multi-scale fusion adapter (the nearest upsampling of the coarser stage, the concatenation, "
                   "its inverted-residual FFN and norm, or the average pooling to the output grid)",
    "vision.proj": "embed_vision (the map read as side² tokens, x sqrt(2048), the soft-embedding RMSNorm, the "
                   "projection, or the scale-free post-projection norm)",
    "audio.layers": "the conformer block (its feed-forwards x residual weight, the chunked local attention with "
                    "relative positions, its softcap and masks, the light convolution, the clamps or the norms)",
    "audio.out": "the audio tower's output (every reduction_factor-th frame, padding frames zeroed)",
    "audio.proj": "embed_audio (the soft-embedding RMSNorm, the projection or the scale-free post-projection norm)",
    "merge": "the merge (hard media tokens embedded by embed_vision / embed_audio's own tables, image tokens and "
             "each clip's tokens at their placeholders in order, the clip's padding and tail as the last audio "
             "token's embedding, not scaled by sqrt(hidden))",
}


def blame(spec, name: str, isolated: bool) -> str:
    """One line naming the wrong operation when ``name`` is the first probe that fails."""
    if getattr(spec, "gemma3n", None) is not None:
        from . import gemma3n_probes

        line = gemma3n_probes.blame(spec, name, isolated)
        if line is not None:
            return line
    if name == "vision.embed" and isinstance(getattr(spec, "multimodal", None), Gemma3nMediaSpec):
        return ("the patch embedding is wrong: MobileNet-V5's stem (its 3x3 stride-2 convolution with 'same' padding, "
                "0 before and 1 after, its bias, RMSNorm2d or GELU)")
    if name == "vision.embed":
        return "the patch embedding is wrong (the patch convolution, the patch order or the learned position table)"
    if name == "audio.embed":
        return "the audio embedding is wrong (the subsampling convolutions, their norms and masks, or the input projection)"
    if is_media(name) or name == "merge":
        how = "" if isolated else " (not isolated: judged against the reference's own stream)"
        return f"the bug is between `{_upstream(spec, name)}` and `{name}` ({_between(spec, name)}){how}"
    kind = locate(name)[1]
    if kind in SUBLAYERS:
        what, inside = SUBLAYERS[kind]
        layer = locate(name)[0]
        donor = spec.layers[layer].kv_donor if layer is not None and kind == "attn" else None
        if donor is not None:
            inside += f", or the layer whose keys and values it shares (layer {donor}'s, from its own input)"
        if isolated:
            return f"{what} computes wrongly on the right input ({inside})"
        return f"{what} or something before it (not isolated: the candidate gives no `{name}_input`)"
    if kind.endswith("_input") and kind[: -len("_input")] in SUBLAYERS or name == "final_norm_input":
        what = SUBLAYERS[kind[: -len("_input")] if name != "final_norm_input" else "final_norm"][0]
        return f"{what}'s input is wrong: the bug is between `{_upstream(spec, name)}` and {what} ({_between(spec, name)})"
    if name == "embed":
        return f"the embedding is wrong ({_between(spec, name)})"
    return f"the bug is between `{_upstream(spec, name)}` and `{name}` ({_between(spec, name)})"
