"""Gemma 3n's media path (HF ``Gemma3nModel``): the MobileNet-V5 vision tower with ``embed_vision`` and the
USM audio tower with ``embed_audio``, as one module the Gemma 3n decoder holds (:class:`reference_impl.gemma3n.
Gemma3n` ``.media``).

Probes (``capture``), in order, each shaped (items, tokens, features)::

    pixels (I, 3, S, S) ─▶ vision.embed (stem; its map's cells as tokens, (I, h·w, C))
        ─▶ vision.layers.{i}.out (every block of the four stages, likewise)
        ─▶ vision.pool (the multi-scale fusion adapter's output, (I, side², 2048))
        ─▶ vision.proj (embed_vision on pool × √2048; (I, side², H))       [reference_impl.mobilenet_v5]
    log-mel features (A, T, M) + mask (A, T) ─▶ audio.embed ─▶ audio.layers.{i}.out ─▶ audio.out
        ─▶ audio.proj (embed_audio; (A, T'', H))                         [reference_impl.audio]

Before the merge, every *hard* media token (an id in the vision or audio embedder's range, the placeholders
among them) is embedded by that embedder's own table and norms in place of the text table's row; then the
image placeholders take every image's tokens, and the audio placeholders every clip's tokens, its padding
frames and the tail up to ``audio_tokens`` replaced by the embedding of the last audio id (HF
``Gemma3nModel.forward``, ``models/gemma3n/modeling_gemma3n.py`` 2067-2121).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from . import ops
from .audio import Audio3nSpec, Embedder3n, Gemma3nAudioTower
from .mobilenet_v5 import MobileNetV5, MobileNetV5Spec
from .spec import Gemma3nMediaSpec

MEDIA_KWARGS = ("pixel_values", "audio_features", "audio_mask")


def as_tokens(x: torch.Tensor) -> torch.Tensor:
    """A feature map (I, C, h, w) as its cells (I, h·w, C)."""
    return x.flatten(2).transpose(1, 2)


def as_map(x: torch.Tensor) -> torch.Tensor:
    """Cells (I, h·w, C) of a square map back to the map (I, C, h, w)."""
    side = math.isqrt(x.shape[1])
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


def tower_spec(mm: Gemma3nMediaSpec) -> MobileNetV5Spec:
    v = mm.vision_config
    return MobileNetV5Spec.from_model_args(v.get("architecture", "mobilenetv5_300m_enc"), v.get("model_args"))


def tower_blocks(mm: Gemma3nMediaSpec) -> tuple[int, tuple[int, ...]]:
    """(blocks over all stages, the flat indices of the blocks the fusion adapter reads: the last of the
    last two stages), as :class:`MobileNetV5` numbers them."""
    ends = itertools.accumulate(len(stage) for stage in tower_spec(mm).stages)
    ends = [end - 1 for end in ends]
    return ends[-1] + 1, (ends[-2], ends[-1])


class Gemma3nMedia(nn.Module):
    def __init__(self, mm: Gemma3nMediaSpec, text_hidden: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.mm = mm
        v = mm.vision_config
        self.width = v.get("hidden_size", 2048)
        self.vision_tower = MobileNetV5(tower_spec(mm), dtype)
        self.embed_vision = Embedder3n(mm.vision_vocab, self.width, text_hidden, v.get("rms_norm_eps", 1e-6),
                                       mm.vision_offset)
        self.audio = Gemma3nAudioTower(Audio3nSpec.from_hf(mm.tower_config), dtype)
        self.to(dtype)
        self.audio.keep_fp32_buffers()

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_vision.embedding_projection.weight.dtype

    # ---- hard tokens -------------------------------------------------------------------------------

    def hard(self, input_ids: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """The embedded text (B, T, H) with every hard vision / audio token's row replaced by its embedder's
        (HF embeds the whole sequence, other ids set to the embedder's last id, then ``torch.where``)."""
        mm = self.mm
        for embedder, low, high in ((self.embed_vision, mm.vision_offset, mm.audio_offset),
                                    (self.audio.embed_audio, mm.audio_offset, None)):
            inside = (input_ids >= low) if high is None else (input_ids >= low) & (input_ids < high)
            dummy = embedder.offset + embedder.embedding.num_embeddings - 1
            rows = embedder(ids=torch.where(inside, input_ids, dummy)).to(embedded.dtype)
            embedded = torch.where(inside[..., None], rows, embedded)
        return embedded

    # ---- soft tokens -------------------------------------------------------------------------------

    @torch.no_grad()
    def vision(self, pixel_values: torch.Tensor, capture: dict | None = None) -> torch.Tensor:
        """pixels (I, 3, S, S) -> ``vision.proj`` (I, side², H); the tower's probes recorded as cells."""
        maps: dict[str, torch.Tensor] | None = None if capture is None else {}
        pooled = self.vision_tower(pixel_values, maps)  # (I, C, side, side)
        for name, value in (maps or {}).items():
            ops.put(capture, name, as_tokens(value))
        return ops.put(capture, "vision.proj", self.project_image(pooled))

    def project_image(self, pooled: torch.Tensor) -> torch.Tensor:
        """``embed_vision`` on the fused map (I, C, side, side) × √C, as HF lays it out (a (I, side², C) view
        of the (I, C, side²) map, m3n:1946-1955)."""
        b, c = pooled.shape[:2]
        cells = pooled.reshape(b, c, -1).permute(0, 2, 1)
        return self.embed_vision(x=cells * self.width**0.5)

    def forward(self, capture: dict | None = None, pixel_values=None, audio_features=None,
                audio_mask=None) -> dict[str, torch.Tensor]:
        """{"image": (I * side², H), "audio": (A * audio_tokens, H)}: the soft tokens of what is given."""
        out = {}
        if pixel_values is not None:
            proj = self.vision(pixel_values, capture)
            out["image"] = proj.reshape(-1, proj.shape[-1])
        if audio_features is not None:
            out["audio"] = self.audio(audio_features, audio_mask, capture)
        return out

    def kept_rows(self, kind: str, projected: torch.Tensor, audio_mask=None, **_) -> torch.Tensor:
        """The soft tokens merged, from a ``vision.proj`` / ``audio.proj`` value: (n, H)."""
        if kind == "image":
            return projected.reshape(-1, projected.shape[-1])
        pad = self.audio.output_padding(audio_mask)
        return self.audio.merged(projected.to(self.dtype), pad).reshape(-1, projected.shape[-1])

    # ---- one step alone, on given values (the gate judges each media probe this way) -----------------

    @torch.no_grad()
    def stream(self, probe: str, value, audio_mask=None, **_) -> torch.Tensor | None:
        """Probe ``probe`` computed from the probe(s) before it on its path (``value(name)``)."""
        tower = self.vision_tower
        if probe.startswith("vision.layers."):
            i = int(probe.split(".")[2])
            prev = value("vision.embed" if i == 0 else f"vision.layers.{i - 1}.out")
            return as_tokens(tower.block(i, as_map(prev.to(self.dtype))))
        if probe == "vision.pool":
            return as_tokens(tower.fuse([as_map(value(f"vision.layers.{i}.out").to(self.dtype)) for i in tower.msfa_taps]))
        if probe == "vision.proj":
            return self.project_image(as_map(value("vision.pool").to(self.dtype)))
        if not probe.startswith("audio."):
            return None
        a = self.audio
        n = len(a.conformer)
        if probe.startswith("audio.layers."):
            i = int(probe.split(".")[2])
            prev = value("audio.embed" if i == 0 else f"audio.layers.{i - 1}.out")
            return a.layer(i, prev, a.subsampled_padding(audio_mask, prev.shape[1]))
        if probe == "audio.out":
            last = value("audio.embed" if n == 0 else f"audio.layers.{n - 1}.out")
            return a.output(last.to(self.dtype), a.subsampled_padding(audio_mask, last.shape[1]))[0]
        if probe == "audio.proj":
            return a.project_from(value("audio.out"))
        return None


def probe_names(mm: Gemma3nMediaSpec) -> list[str]:
    blocks, _ = tower_blocks(mm)
    audio = Audio3nSpec.from_hf(mm.tower_config)
    return ["vision.embed", *(f"vision.layers.{i}.out" for i in range(blocks)), "vision.pool", "vision.proj",
            "audio.embed", *(f"audio.layers.{i}.out" for i in range(audio.a["conf_num_hidden_layers"])), "audio.out",
            "audio.proj"]


def _hf_name(name: str) -> str:
    """Reference name under ``media.`` -> HF ``Gemma3nForConditionalGeneration`` name."""
    if name.startswith("vision_tower."):
        return "model.vision_tower.timm_model." + name.removeprefix("vision_tower.")
    if name.startswith("embed_vision."):
        return "model." + name
    from .audio import _hf_name_3n

    return _hf_name_3n(name.removeprefix("audio."))


def media_entries(mm: Gemma3nMediaSpec, text_hidden: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(HF name, reference name, shape) of every media tensor the checkpoint carries."""
    with torch.device("meta"):
        media = Gemma3nMedia(mm, text_hidden)
    return [(_hf_name(name), f"media.{name}", tuple(t.shape)) for name, t in media.state_dict().items()]
