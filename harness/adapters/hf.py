"""Adapters for torch modules with the HF ``*ForCausalLM`` interface: HF Transformers itself, or a
third-party port given as a class.

The class is built as ``cls(hf_config)`` (an HF config object, eager attention requested) under
the chosen default dtype, so parameters are created in that dtype while RoPE ``inv_freq`` buffers
stay fp32 — what ``from_pretrained(dtype=...)`` gives — then it loads the HF state dict. Probes come
from forward hooks on ``model.model.embed_tokens``, ``model.model.layers[i]`` (and its
``self_attn`` and ``mlp``) and ``model.model.norm``; logits from the output's ``.logits``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping

import torch

from ..synthetic import Batch
from .base import Adapter, AdapterError, Unsupported, feed_in_chunks


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def hf_config_object(hf_config: Mapping):
    from transformers import AutoConfig

    config = AutoConfig.for_model(**dict(hf_config))
    config._attn_implementation = "eager"
    return config


def _first(output):
    if isinstance(output, (tuple, list)):
        return output[0]
    return getattr(output, "last_hidden_state", output)  # a ModelOutput (e.g. Gemma 4's vision tower)


def _input(args, kwargs):
    """The first tensor a module was called with (positional, or ``hidden_states=``/``x=``)."""
    if args:
        return args[0]
    return kwargs.get("hidden_states", kwargs.get("x"))


def _as_from_pretrained(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Make a model built from a config under ``dtype`` hold what ``from_pretrained(dtype=...)`` gives.

    They differ in one place: Gemma 4's audio position encoding computes its ``inv_timescales`` (a
    non-persistent buffer) when built; under a bf16 default dtype that ``exp`` runs in bf16, while
    ``from_pretrained`` computes it in fp32 and casts (checked: save_pretrained + from_pretrained(bf16)
    of the gemma-4-e2b-mm twin; max difference 4.9e-4, every other buffer equal). Rebuilt here the fp32
    way; without it the reference (which follows from_pretrained) and HF differed by 0.016 at
    ``audio.layers.0.out`` in bf16. Gemma 3n's audio attention does the same with its relative-position
    ``inv_timescales``, which ``from_pretrained(dtype=bfloat16)`` holds in fp32 computed in fp32 (checked the
    same way on the gemma-3n-e2b-mm twin: 0.0018 from the bf16 ``exp``; its other buffers equal)."""
    for module in model.modules():
        kind = type(module).__name__
        if kind == "Gemma4AudioRelPositionalEncoding" and module.inv_timescales.dtype != torch.float32:
            with default_dtype(torch.float32):
                fresh = type(module)(model.config.audio_config)
            module.inv_timescales = fresh.inv_timescales.to(module.inv_timescales.dtype)
        elif kind == "Gemma3nAudioRelativePositionEmbedding":
            with default_dtype(torch.float32), torch.device("cpu"):
                fresh = type(module)(module.config)
            module.inv_timescales = fresh.inv_timescales.to(module.inv_timescales.device)


def _check_backends(hf_config) -> None:
    """HF builds Gemma 3n's vision tower through timm (``TimmWrapperModel``), and timm imports torchvision:
    without them the model cannot be built here, which is this run's one-line "unsupported", not a crash."""
    if dict(hf_config).get("model_type") != "gemma3n":
        return
    try:
        import timm  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or torchvision's RuntimeError beside a CPU-only torch
        raise Unsupported("model", "HF builds Gemma 3n's MobileNet-V5 vision tower through timm, which does not "
                                   f"import here ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                                   "`tox -e timm` runs it (torch 2.14.1 + torchvision 0.29.1 + timm)") from None


class HFCausalLMAdapter(Adapter):
    def __init__(self, model_class=None, name: str | None = None):
        self.model_class = model_class
        self.name = name or (model_class.__name__ if model_class else "hf")
        self.unsupported: dict[str, str] = {}

    @property
    def families(self) -> tuple[str, ...] | None:
        """The generation an HF-compatible class builds (its config class's model type), if it says."""
        model_type = getattr(getattr(self.model_class, "config_class", None), "model_type", None)
        return (model_type,) if model_type else None

    def build(self, config, dtype: torch.dtype) -> torch.nn.Module:
        with default_dtype(dtype):
            return self.model_class(config)

    def load(self, hf_config, state_dict, dtype: torch.dtype) -> None:
        _check_backends(hf_config)
        config = hf_config_object(hf_config)
        try:
            model = self.build(config, dtype)
        except Unsupported:
            raise
        except Exception as exc:  # noqa: BLE001
            raise AdapterError(f"{self.name}: building the model failed: {type(exc).__name__}: {exc}") from exc
        _as_from_pretrained(model, dtype)
        params = dict(model.state_dict())
        cast = {k: v.to(params[k].dtype) if k in params else v for k, v in state_dict.items()}
        missing, unexpected = model.load_state_dict(cast, strict=False)
        tied = getattr(config, "tie_word_embeddings", False)
        missing = [m for m in missing if not (tied and m == "lm_head.weight")]
        if missing or unexpected:
            what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
            raise AdapterError(f"{self.name}: state dict does not fit the model: {what}")
        if tied and hasattr(model, "tie_weights"):
            model.tie_weights()
        self.model = model.eval()
        self.unsupported = self._declared()

    def _forward_params(self) -> dict[str, inspect.Parameter] | None:
        """The forward's named parameters, or None when it takes ``**kwargs`` (or cannot be inspected)."""
        try:
            params = inspect.signature(self.model.forward).parameters
        except (TypeError, ValueError):
            return None
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return None
        return dict(params)

    def _declared(self) -> dict[str, str]:
        """Features a hand-written port's forward cannot take: it has no attention_mask / position_ids."""
        params = self._forward_params()
        if params is None:
            return {}
        return {feature: f"{type(self.model).__name__}.forward() takes no {arg}"
                for feature, arg in (("padding", "attention_mask"), ("position_ids", "position_ids")) if arg not in params}

    def _accepted(self, kwargs: dict) -> dict:
        """The keyword arguments the model's forward takes (a hand-written port may take fewer)."""
        params = self._forward_params()
        return {k: v for k, v in kwargs.items() if v is not None and (params is None or k in params)}

    def _hook_targets(self) -> dict[str, torch.nn.Module]:
        """probe -> the module whose call gives it; ``*_input`` probes come from the same module's input.
        An image-text model (``model.model.language_model``) adds its image path (:meth:`_vision_targets`);
        Gemma 3n has its own (:func:`harness.gemma3n_probes.hf_targets`)."""
        if getattr(self.model.config, "model_type", None) in ("gemma3n_text", "gemma3n"):
            from ..gemma3n_probes import hf_targets

            return hf_targets(self.model)
        inner = getattr(self.model, "model", None)
        vision = {}
        if getattr(inner, "language_model", None) is not None:
            vision = self._vision_targets(inner)
            inner = inner.language_model
        layers = getattr(inner, "layers", None)
        if inner is None or layers is None:
            self.unsupported = {**self.unsupported, "*": "model has no model.model.layers; only logits are compared"}
            return {}
        targets = {}
        for attr, probe in (("embed_tokens", "embed"), ("norm", "final_norm")):
            if hasattr(inner, attr):
                targets[probe] = getattr(inner, attr)
            else:
                self.unsupported[probe] = f"model.model has no {attr}"
        for i, layer in enumerate(layers):
            targets[f"layers.{i}.out"] = layer
            for attr, sub in (("self_attn", "attn"), ("mlp", "mlp")):
                if hasattr(layer, attr):
                    targets[f"layers.{i}.{sub}"] = getattr(layer, attr)
                else:
                    self.unsupported[f"layers.{i}.{sub}"] = f"layer {i} has no {attr}"
            # Gemma 4: router (probs, top-k weights, top-k ids), experts output, per-layer-input branch
            for attr, sub in (("router", "router"), ("experts", "moe"), ("per_layer_projection", "ple")):
                if getattr(layer, attr, None) is not None:
                    targets[f"layers.{i}.{sub}"] = getattr(layer, attr)
        return {**vision, **targets}

    def _gemma4_media_targets(self, inner) -> dict[str, torch.nn.Module]:
        """Gemma 4's media paths: the vision tower's patch embedder, encoder layers and pooled output (whose
        call returns it), ``embed_vision``; the audio tower's subsampling, conformer layers and output
        projection, ``embed_audio``."""
        vision = inner.vision_tower
        targets = {"vision.embed": vision.patch_embedder}
        targets |= {f"vision.layers.{i}.out": layer for i, layer in enumerate(vision.encoder.layers)}
        targets |= {"vision.pool": vision, "vision.proj": inner.embed_vision}
        audio = getattr(inner, "audio_tower", None)
        if audio is not None:
            targets["audio.embed"] = audio.subsample_conv_projection
            targets |= {f"audio.layers.{i}.out": layer for i, layer in enumerate(audio.layers)}
            targets |= {"audio.out": audio.output_proj, "audio.proj": inner.embed_audio}
        return targets

    def _image_rows(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Gemma 4's kept pooled rows (n_0 + n_1 + …, C) -> (images, pooled slots, C): image i's n_i rows
        first, zeros after (the reference's layout of ``vision.pool`` / ``vision.proj``)."""
        k2 = self.model.config.vision_config.pooling_kernel_size ** 2
        counts = ((positions != -1).all(-1).sum(-1) // k2).tolist()
        out = rows.new_zeros(positions.shape[0], positions.shape[1] // k2, rows.shape[-1])
        for i, part in enumerate(torch.split(rows, counts)):
            out[i, :part.shape[0]] = part
        return out

    def _method_probes(self, captured: dict, b: int, t: int):
        """A context in which probes that are no module's output (Gemma 3n's AltUp ``predict`` / ``correct``
        methods) are captured too: :func:`harness.gemma3n_probes.hf_method_probes`; else nothing."""
        if getattr(self.model.config, "model_type", None) in ("gemma3n_text", "gemma3n"):
            from ..gemma3n_probes import hf_method_probes

            return hf_method_probes(self.model, captured, b, t)
        return contextlib.nullcontext()

    def _vision_targets(self, inner) -> dict[str, torch.nn.Module]:
        """Gemma 3's image path: the SigLIP tower's embeddings, encoder layers and final LayerNorm, the
        projector's pooling and the projector itself (``vision.*`` probes)."""
        if getattr(inner, "embed_vision", None) is not None:
            return self._gemma4_media_targets(inner)
        tower = getattr(inner, "vision_tower", None)
        tower = getattr(tower, "vision_model", tower)  # older layouts nest the transformer one level down
        projector = getattr(inner, "multi_modal_projector", None)
        if tower is None or projector is None:
            self.unsupported = {**self.unsupported, "vision.embed": "model.model has no vision_tower / multi_modal_projector"}
            return {}
        targets = {"vision.embed": tower.embeddings}
        targets |= {f"vision.layers.{i}.out": layer for i, layer in enumerate(tower.encoder.layers)}
        targets |= {"vision.post_norm": tower.post_layernorm, "vision.pool": projector.avg_pool, "vision.proj": projector}
        return targets

    @torch.no_grad()
    def run(self, batch: Batch) -> dict[str, torch.Tensor]:
        captured, _ = self._forward(batch.input_ids, batch.attention_mask, batch.position_ids, media=self._media(batch))
        return captured

    def _media(self, batch: Batch) -> dict:
        """An image batch's inputs as HF takes them: the pixels in the model's dtype, and the token types
        without which HF keeps image tokens causal (Gemma 3 ``token_type_ids``: 1 at image placeholders;
        Gemma 4 ``mm_token_type_ids``: 1 image, 2 video, 3 audio, with the patch positions and the audio
        features and their mask)."""
        if batch.pixel_values is None and batch.audio_features is None:
            return {}
        config = self.model.config
        # the processor's float32 pixels and features as they are: HF casts them where its recipe does
        pixels = {} if batch.pixel_values is None else {"pixel_values": batch.pixel_values}
        if config.model_type == "gemma3n":  # causal media: no token types
            audio = {} if batch.audio_features is None else {"input_features": batch.audio_features,
                                                             "input_features_mask": batch.audio_mask}
            return pixels | audio
        if config.model_type != "gemma4":
            return pixels | {"token_type_ids": (batch.input_ids == config.image_token_id).long()}
        types = torch.zeros_like(batch.input_ids)
        for token, kind in ((config.image_token_id, 1), (config.video_token_id, 2), (config.audio_token_id, 3)):
            types[batch.input_ids == token] = kind
        out = pixels | {"mm_token_type_ids": types}
        if batch.image_position_ids is not None:
            out["image_position_ids"] = batch.image_position_ids
        if batch.audio_features is not None:
            out |= {"input_features": batch.audio_features, "input_features_mask": batch.audio_mask}
        return out

    @torch.no_grad()
    def decode(self, batch: Batch, chunks: list[int]) -> dict[str, torch.Tensor]:
        """Feed the batch through the model's own cache, ``chunks`` tokens at a time (a prefill, then
        steps), the way ``generate`` drives it: ``past_key_values`` + ``use_cache=True``, the attention
        mask covering everything so far. Returns every probe, concatenated over the chunks."""
        past = None

        def step(ids, mask, positions):
            nonlocal past
            captured, past = self._forward(ids, mask, positions, past=past, use_cache=True)
            return captured

        return feed_in_chunks(batch, chunks, step)

    @torch.no_grad()
    def bench_generate(self, input_ids: torch.Tensor, steps: int, on_token) -> None:
        """HF's own ``generate`` (greedy, EOS off, its default cache); a streamer reports each step's tokens.
        A port without ``generate`` (no ``GenerationMixin``) is unsupported: the benchmark must time the
        port's own generation path, not one the harness would write for it."""
        if not callable(getattr(self.model, "generate", None)):
            raise Unsupported("generate", f"{type(self.model).__name__} has no generate() (HF GenerationMixin); "
                                          "give the adapter a bench_generate() to benchmark it")
        from transformers import GenerationConfig
        from transformers.generation.streamers import BaseStreamer

        class Clock(BaseStreamer):
            prompt_seen = False

            def put(self, value):
                if not self.prompt_seen:  # generate puts the prompt first
                    self.prompt_seen = True
                    return
                on_token(value)

            def end(self):
                pass

        config = GenerationConfig(max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0,
                                  use_cache=True, return_dict_in_generate=True)
        out = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config,
                                  streamer=Clock())
        self._past = out.past_key_values

    def cache_bytes(self) -> int | None:
        past = getattr(self, "_past", None)
        layers = getattr(past, "layers", None)
        if layers is None:
            return None
        return sum(t.nbytes for layer in layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                   if isinstance(t, torch.Tensor))

    def _forward(self, ids, mask, positions, past=None, use_cache=False, media=None):
        captured: dict[str, torch.Tensor] = {}
        b, t = ids.shape
        merged = getattr(getattr(self.model, "model", None), "language_model", None) is not None  # image-text

        def hook(name):
            def record(_module, args, kwargs, output):
                x = _input(args, kwargs)
                if name in ("vision.pool", "vision.proj") and (media or {}).get("image_position_ids") is not None:
                    rows = _first(output).detach()  # Gemma 4: the kept rows of every image, (n, C)
                    captured[name] = self._image_rows(rows.reshape(-1, rows.shape[-1]), media["image_position_ids"])
                    return
                if name.endswith(".proj") and kwargs.get("input_ids") is not None:
                    return  # Gemma 3n embeds its hard media tokens with the same embedder: not the soft tokens
                out = _first(output)
                if name.startswith("vision.") and out.dim() == 4:  # a map (images, C, h, w) -> (images, h*w, C)
                    # a copy: Gemma 3n scales the fused map in place (``last_hidden_state *= C**0.5``) afterwards
                    captured[name] = out.detach().flatten(2).transpose(1, 2).clone()
                    return
                if name.startswith(("vision.", "audio.")):
                    captured[name] = _first(output).detach()
                    return
                if name == "layers.0.out" and merged:  # what layer 0 reads: the text with the soft tokens merged
                    captured["merge"] = x.detach()
                if name.endswith(".router"):  # (probs (N, E), weights (N, K), experts (N, K)) -> dispatch (B, T, E)
                    probs, weights, experts = output
                    dispatch = torch.zeros_like(probs).scatter(-1, experts, weights.to(probs.dtype))
                    captured[name] = dispatch.reshape(b, t, -1)
                    captured[name + "_probs"] = probs.reshape(b, t, -1)
                elif name.endswith(".moe"):  # experts work on the flattened (B*T, H) stream
                    captured[name] = _first(output).detach().reshape(b, t, -1)
                else:
                    captured[name] = _first(output).detach()
                if x is not None and not name.endswith((".out", "embed")):
                    captured[name + "_input"] = x.detach().reshape(b, t, -1)

            return record

        handles = [module.register_forward_hook(hook(name), with_kwargs=True)
                   for name, module in self._hook_targets().items()]
        try:
            kwargs = {"attention_mask": mask, "position_ids": positions, "use_cache": use_cache,
                      "past_key_values": past, **(media or {})}
            with self._method_probes(captured, b, t):
                out = self.model(input_ids=ids, **self._accepted(kwargs))
        finally:
            for handle in handles:
                handle.remove()
        logits = getattr(out, "logits", None)
        captured["logits"] = logits if logits is not None else _first(out)
        return captured, getattr(out, "past_key_values", None)


class _HFAuto(HFCausalLMAdapter):
    """HF Transformers as a ``from_pretrained(dtype=..., attn_implementation=...)`` load gives it
    (eager by default: the attention the gate compares against)."""

    def __init__(self, name: str, attn: str = "eager"):
        super().__init__(name=name)
        self.attn = attn

    def build(self, config, dtype):
        from transformers import AutoModelForCausalLM

        try:
            return AutoModelForCausalLM.from_config(config, attn_implementation=self.attn, dtype=dtype)
        except ValueError as exc:
            if "does not support an attention implementation" not in str(exc):
                raise
            raise Unsupported("attention", f"HF {config.model_type} has no {self.attn} attention "
                                           f"({str(exc).split('. ')[0]})") from exc


def hf_adapter(attn: str = "eager") -> HFCausalLMAdapter:
    import transformers

    suffix = "" if attn == "eager" else f"-{attn}"
    return _HFAuto(name=f"hf-transformers-{transformers.__version__}{suffix}", attn=attn)
