"""Gemma 3n's probes: their names in forward order, what each stream probe is computed from, the verdict
line when one is the first to fail, and where HF ``Gemma3nForCausalLM`` gives each value.

Gemma 3n carries ``n`` AltUp streams instead of one residual stream (see :mod:`reference_impl.gemma3n`),
so besides the generic probes it has ``altup_streams`` (the n initial streams), and per layer
``altup_predict`` (the predicted streams), ``laurel`` (the LAuReL branch) and ``altup_correct`` (the
corrected streams, before the PLE branch). Stream probes hold the n streams side by side, (B, T, n * H).

How each probe is judged alone (the reference on the candidate's own values; ``p = layers.{i}``, prev =
``altup_streams`` for layer 0, else ``layers.{i-1}.out``):

=====================  ===========================================  ===========================================
probe                  computed by the reference from               what lies between (where a failure points)
=====================  ===========================================  ===========================================
``altup_streams``      ``embed``                                    AltUp projections, rescale to embed's RMS
``p.altup_predict``    prev                                         AltUp prediction (router, 1/H, coefs)
``p.attn_input``       ``p.altup_predict``                          pre-attention norm of the active prediction
``p.laurel``           ``p.attn_input``                             LAuReL itself
``p.attn``             ``p.attn_input`` (sublayer; donor's input)   the attention
``p.mlp_input``        ``p.altup_predict``, ``p.attn``, ``p.laurel``  post-attn norm, sum with LAuReL, /√2, pre-MLP norm
``p.mlp``              ``p.mlp_input`` (sublayer)                   the MLP, its Gaussian top-k included
``p.altup_correct``    ``p.altup_predict``, ``attn``, ``laurel``,   the layer's output (its /√2 and post-MLP
                       ``mlp``                                      norm) and the AltUp correction
``p.ple_input``        ``p.altup_correct``, ``embed`` (+ ids)        correct_output_scale, per-layer gate, PLE
``p.ple``              ``p.ple_input`` (sublayer)                   the per-layer projection
``p.out``              ``p.altup_correct``, ``p.ple``               post-PLE norm, its add to streams [1:]
``final_norm_input``   the last ``out``                             unembed projections, rescale, mean
``final_norm``         ``final_norm_input`` (sublayer)              the final RMSNorm
=====================  ===========================================  ===========================================

On the image-audio-text model (``Gemma3nForConditionalGeneration``) the media probes come first (the
generic ones, :func:`harness.probes.vision`), then ``embed`` and ``merge``; ``merge`` stands where ``embed``
stands above: the streams and the per-layer projection read it.

The pre-MLP norm makes ``mlp_input`` blind to the scale of the attention half's residual (RMSNorm is scale
invariant): a missing ``/√2`` first shows at ``altup_correct``, whose verdict names it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PER_LAYER = ("altup_predict", "attn_input", "laurel", "attn", "mlp_input", "mlp", "altup_correct", "ple_input",
             "ple", "out")
STREAMS = ("altup_streams", "altup_predict", "altup_correct", "out")  # probes holding all n streams, (B, T, n*H)


def _locate(name: str) -> tuple[int | None, str]:
    from .probes import locate

    return locate(name)


def for_spec(spec) -> list[str]:
    """Every probe of a Gemma 3n model, in forward order."""
    from .probes import vision

    merge = ["merge"] if spec.multimodal is not None else []
    names = [*vision(spec), "embed", *merge, "altup_streams"]
    for layer in spec.layers:
        names += [f"layers.{layer.index}.{kind}" for kind in PER_LAYER]
    return names + ["final_norm_input", "final_norm", "logits"]


def upstream_values(spec, name: str) -> list[str] | None:
    """The probes a stream probe is computed from (see the module docstring), or None for the sublayers
    (``attn``, ``mlp``, ``ple``, ``final_norm``: rerun on their ``*_input``), ``embed`` and ``logits``."""
    context = "merge" if spec.multimodal is not None else "embed"  # what the streams and PLE projection read
    if name == "altup_streams":
        return [context]
    if name == "final_norm_input":
        return [f"layers.{spec.num_layers - 1}.out"]
    layer, kind = _locate(name)
    if layer is None:
        return None
    p = f"layers.{layer}"
    prev = "altup_streams" if layer == 0 else f"layers.{layer - 1}.out"
    return {
        "altup_predict": [prev],
        "attn_input": [f"{p}.altup_predict"],
        "laurel": [f"{p}.attn_input"],
        "mlp_input": [f"{p}.altup_predict", f"{p}.attn", f"{p}.laurel"],
        "altup_correct": [f"{p}.altup_predict", f"{p}.attn", f"{p}.laurel", f"{p}.mlp"],
        "ple_input": [f"{p}.altup_correct", context],
        "out": [f"{p}.altup_correct", f"{p}.ple"],
    }.get(kind)


_SUBLAYERS = {  # kind -> (what it is, what is inside it)
    "attn": ("the attention", "its q/k/v projections, QK norms with gains and the V norm without, RoPE, score "
                              "scale 1, sliding-window mask, softmax or output projection"),
    "laurel": ("LAuReL", "its low-rank left/right projections, its post-norm, or the add of its own input"),
    "mlp": ("the MLP", "its gate/up projections, the Gaussian top-k on the gate (relu(g - (mean + std * "
                       "icdf(sparsity)))) where this layer's sparsity > 0, GELU or down projection"),
    "ple": ("the per-layer projection", "the projection back to the hidden size"),
    "final_norm": ("the final norm", "the RMSNorm itself (x * w: its eps, pow or dtype)"),
}


def _between(spec, name: str) -> tuple[str, str]:
    """(the probe right before the operations producing stream probe ``name``, what those operations are)."""
    if name == "altup_streams":
        context = "merge" if spec.multimodal is not None else "embed"
        return context, ("the AltUp stream expansion: streams 1.. are the altup_projections of the embedding, "
                         "rescaled to its RMS (mean square clamped at 1e-5)")
    if name == "final_norm_input":
        return f"layers.{spec.num_layers - 1}.out", (
            "the collapse of the streams: the altup_unembed_projections of streams 1.., their rescale to stream "
            "0's RMS (mean square clamped at 1e-5), or the mean over the n streams")
    if name == "logits":
        return "final_norm", "the LM head (tied embedding) or the final softcap"
    layer, kind = _locate(name)
    p = f"layers.{layer}"
    prev = "altup_streams" if layer == 0 else f"layers.{layer - 1}.out"
    active = spec.gemma3n.altup_active_idx
    return {
        "altup_predict": (prev, "the AltUp prediction: the router norm, the 1/hidden router input scale, the "
                                "modality router and its tanh, the prediction coefficients, the per-token mix "
                                "of all streams or the add of the streams themselves"),
        "attn_input": (f"{p}.altup_predict", f"the pre-attention norm of the active stream's prediction "
                                             f"(stream {active})"),
        "mlp_input": (f"{p}.laurel", "the post-attention norm, the sum of the active prediction, the normed "
                                     "attention and LAuReL, or the pre-MLP norm (the division by sqrt(2) "
                                     "cannot show here: the norm undoes a scale)"),
        "altup_correct": (f"{p}.mlp", "the layer's output on the active stream ((active prediction + "
                                      "post-attention norm(attn) + LAuReL) / sqrt(2) + post-MLP norm(mlp): "
                                      "a missing / sqrt(2) shows here first) or the AltUp correction (its "
                                      "router on that output with the 1/hidden scale, correction "
                                      "coefficients + 1, the innovation output - active prediction added to "
                                      "every stream's prediction)"),
        "ple_input": (f"{p}.altup_correct", "correct_output_scale on the active corrected stream, the "
                                            "per-layer gate and its GELU, or the per-layer input (token table "
                                            "x sqrt(dim) with ids beyond its vocabulary reading row 0, context "
                                            "projection x hidden^-1/2 and its norm, x 1/sqrt(2))"),
        "out": (f"{p}.ple", "the post-PLE norm or its add, which goes to streams 1.. only (not stream 0), "
                            "or the corrected streams changed on the way (correct_output_scale scales only "
                            "the copy that feeds the per-layer gate)"),
    }[kind]


def blame(spec, name: str, isolated: bool) -> str | None:
    """One line naming the wrong operation when ``name`` is the first probe that fails."""
    if name == "embed":
        return "the embedding is wrong (the embedding lookup or its sqrt(hidden) normalizer rounded to the model dtype)"
    layer, kind = _locate(name)
    if kind in _SUBLAYERS:
        what, inside = _SUBLAYERS[kind]
        donor = spec.layers[layer].kv_donor if layer is not None and kind == "attn" else None
        if donor is not None:
            inside += (f", or the keys and values it shares: layer {donor}'s, computed by layer {donor} from its "
                       "own input, not by this layer")
        if isolated:
            return f"{what} computes wrongly on the right input ({inside})"
        given = f"`{name}_input`" if kind != "laurel" else f"`layers.{layer}.attn_input`"
        return f"{what} or something before it (not isolated: the candidate gives no {given})"
    if name not in ("logits", "altup_streams", "final_norm_input") and kind not in PER_LAYER:
        return None
    how = "" if isolated or name == "logits" else " (not isolated: judged against the reference's own stream)"
    before, ops = _between(spec, name)
    if kind.endswith("_input"):
        what = _SUBLAYERS[kind.removesuffix("_input")][0]
        return f"{what}'s input is wrong: the bug is between `{before}` and {what} ({ops}){how}"
    return f"the bug is between `{before}` and `{name}` ({ops}){how}"


# ---- HF Gemma3nForCausalLM: where each probe is ----

def hf_targets(model) -> dict[str, torch.nn.Module]:
    """probe -> the HF module whose output it is (the adapter's hooks also record the module's input as
    ``probe + "_input"``: ``attn_input``, ``mlp_input``, ``ple_input``, ``final_norm_input``). The stream
    probes (``altup_streams``, ``altup_predict``, ``altup_correct``, ``out``) are no module's (B, T, ...)
    output: :func:`hf_method_probes` records them."""
    lm = language_model(model)
    targets = {"embed": lm.embed_tokens, "final_norm": lm.norm}
    if lm is not model.model:  # Gemma3nForConditionalGeneration: the media paths too
        targets |= hf_media_targets(model.model)
    for i, layer in enumerate(lm.layers):
        targets |= {f"layers.{i}.attn": layer.self_attn, f"layers.{i}.laurel": layer.laurel,
                    f"layers.{i}.mlp": layer.mlp, f"layers.{i}.ple": layer.per_layer_projection}
    return targets


def language_model(model):
    """The text decoder: ``model.model`` (Gemma3nForCausalLM) or ``model.model.language_model``."""
    return getattr(model.model, "language_model", None) or model.model


def hf_media_targets(inner) -> dict[str, torch.nn.Module]:
    """Gemma3nModel's media paths: timm's MobileNet-V5 stem, every block of every stage (flat, in order)
    and its fusion adapter, ``embed_vision`` (soft calls only: the adapter skips its hard-token call); the
    audio tower's subsampling, conformer blocks and output, ``embed_audio`` (soft calls only)."""
    timm_model = inner.vision_tower.timm_model
    blocks = [block for stage in timm_model.blocks for block in stage]
    targets = {"vision.embed": timm_model.conv_stem}
    targets |= {f"vision.layers.{i}.out": block for i, block in enumerate(blocks)}
    targets |= {"vision.pool": timm_model.msfa, "vision.proj": inner.embed_vision}
    audio = inner.audio_tower
    targets["audio.embed"] = audio.subsample_conv_projection
    targets |= {f"audio.layers.{i}.out": block for i, block in enumerate(audio.conformer)}
    return targets | {"audio.out": audio, "audio.proj": inner.embed_audio}


def _flat(streams: torch.Tensor) -> torch.Tensor:
    """(n, B, T, H) -> (B, T, n * H), a copy."""
    n, b, t, h = streams.shape
    return streams.detach().permute(1, 2, 0, 3).reshape(b, t, n * h).clone()


def _recording(captured: dict, name: str, method):
    def wrapped(*args, **kwargs):
        streams = method(*args, **kwargs)
        captured[name] = _flat(streams)  # a copy: HF changes correct's result in place afterwards
        return streams

    return wrapped


@contextlib.contextmanager
def hf_method_probes(model, captured: dict, b: int, t: int) -> Iterator[None]:
    """During the forward, record the stream probes as (B, T, n * H): ``altup_streams`` (layer 0's input),
    each layer's AltUp ``predict`` and ``correct`` results (methods, wrapped on the instance and restored
    afterwards; a port's own bound methods included) and each layer's output (``out``)."""
    lm = language_model(model)
    handles, wrapped = [], []

    def streams_in(_module, args, kwargs):
        captured["altup_streams"] = _flat(args[0] if args else kwargs["hidden_states"])

    def merged_in(_module, _args, kwargs):  # what the decoder reads: the text with the media merged
        captured["merge"] = kwargs["inputs_embeds"].detach()

    def streams_out(name):
        def record(_module, _args, output):
            captured[name] = _flat(output[0] if isinstance(output, (tuple, list)) else output)

        return record

    try:
        handles.append(lm.layers[0].register_forward_pre_hook(streams_in, with_kwargs=True))
        if lm is not model.model:
            handles.append(lm.register_forward_pre_hook(merged_in, with_kwargs=True))
        for i, layer in enumerate(lm.layers):
            handles.append(layer.register_forward_hook(streams_out(f"layers.{i}.out")))
            for method, kind in (("predict", "altup_predict"), ("correct", "altup_correct")):
                own = vars(layer.altup).get(method)  # an instance attribute a port may have bound
                wrapped.append((layer.altup, method, own))
                setattr(layer.altup, method, _recording(captured, f"layers.{i}.{kind}", getattr(layer.altup, method)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, method, own in wrapped:
            if own is None:
                delattr(module, method)
            else:
                setattr(module, method, own)
