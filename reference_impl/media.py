"""Gemma 4's media path: the vision tower (every size) and the audio tower (E2B/E4B), each with its
projector, as one module the decoder holds (:class:`reference_impl.model.Gemma` ``.media``).

Probes (``capture``), in order, each shaped (items, tokens, features)::

    image patches (I, P, 3p²) + positions (I, P, 2) ─▶ vision.embed ─▶ vision.layers.{i}.out
        ─▶ vision.pool (pooled, ×√C, standardised; (I, P/k², C), stripped rows 0)
        ─▶ vision.proj (embed_vision; (I, P/k², H))                       [reference_impl.gemma4_vision]
    log-mel features (A, T, M) + mask (A, T) ─▶ audio.embed (subsampled; (A, T/4, C))
        ─▶ audio.layers.{i}.out ─▶ audio.out (output_proj) ─▶ audio.proj (embed_audio; (A, T/4, H))
                                                                          [reference_impl.audio]

The soft tokens merged into the text are the kept rows: image i's first n_i pooled rows (its valid
patches / k²), and each clip's valid frames, in order (HF ``Gemma4Model.forward``,
``models/gemma4/modeling_gemma4.py`` 2396-2462).
"""

from __future__ import annotations

import torch
from torch import nn

from .audio import AudioSpec, Gemma4AudioTower
from .audio import _hf_name as _audio_hf_name
from .gemma4_vision import Gemma4VisionTower, VisionSettings, rope_2d_inv_freq
from .gemma4_vision import _entries as _vision_entries
from .spec import Gemma4MediaSpec

MEDIA_KWARGS = ("pixel_values", "image_position_ids", "audio_features", "audio_mask")


class Gemma4Media(nn.Module):
    def __init__(self, mm: Gemma4MediaSpec, text_hidden: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.vision = Gemma4VisionTower(mm.vision_config, text_hidden, dtype)
        self.audio = Gemma4AudioTower(AudioSpec.from_hf(mm.tower_config), dtype) if mm.audio_config else None

    def keep_fp32_tables(self, device) -> None:
        """The 2D RoPE frequencies stay fp32 (as ``from_pretrained`` keeps them) after ``.to(dtype)``, and real
        (not meta) on a model built on the meta device."""
        s = self.vision.settings
        self.vision.inv_freq = rope_2d_inv_freq(s.head_dim, s.rope_theta).to(device)

    def forward(self, capture: dict | None = None, pixel_values=None, image_position_ids=None, audio_features=None,
                audio_mask=None) -> dict[str, torch.Tensor]:
        """{"image": (n_image_tokens, H), "audio": (n_audio_tokens, H)}: the soft tokens of what is given."""
        out = {}
        if pixel_values is not None:
            out["image"] = torch.cat(self.vision(pixel_values, image_position_ids, capture))
        if audio_features is not None:
            if self.audio is None:
                raise ValueError("audio given, but this model has no audio tower (audio_config is null)")
            out["audio"] = self.audio(audio_features, audio_mask, capture)
        return out

    def kept_rows(self, kind: str, projected: torch.Tensor, image_position_ids=None, audio_mask=None, **_) -> torch.Tensor:
        """The soft tokens merged, from a ``vision.proj`` / ``audio.proj`` value: (n, H)."""
        if kind == "image":
            return projected[self.vision.token_mask(image_position_ids)]
        frames = self.audio.frame_mask(audio_mask)
        return projected[frames]

    def stream(self, probe: str, value, image_position_ids=None, audio_mask=None, **_) -> torch.Tensor | None:
        """Probe ``probe`` computed from the probe before it on its path (``value(name)``)."""
        if probe.startswith("vision."):
            return self.vision.stream(probe, value, image_position_ids)
        if self.audio is None or not probe.startswith("audio."):
            return None
        n = len(self.audio.layers)
        frames = self.audio.frame_mask(audio_mask)
        if probe.startswith("audio.layers."):
            i = int(probe.split(".")[2])
            return self.audio.layer(i, value("audio.embed" if i == 0 else f"audio.layers.{i - 1}.out"), frames)
        if probe == "audio.out":
            return self.audio.output(value("audio.embed" if n == 0 else f"audio.layers.{n - 1}.out"))
        if probe == "audio.proj":
            return self.audio.project_from(value("audio.out"))
        return None


def probe_names(mm: Gemma4MediaSpec) -> list[str]:
    vision_layers = VisionSettings.from_config(mm.vision_config).num_layers
    names = ["vision.embed", *(f"vision.layers.{i}.out" for i in range(vision_layers)), "vision.pool", "vision.proj"]
    if mm.audio_config is not None:
        audio_layers = AudioSpec.from_hf(mm.tower_config).layers
        names += ["audio.embed", *(f"audio.layers.{i}.out" for i in range(audio_layers)), "audio.out", "audio.proj"]
    return names


def media_entries(mm: Gemma4MediaSpec, text_hidden: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(HF name as ``Gemma4ForConditionalGeneration.state_dict()`` gives it, reference name, shape)."""
    out = [(hf, f"media.vision.{ref}", shape)
           for hf, ref, shape in _vision_entries(VisionSettings.from_config(mm.vision_config), text_hidden)]
    if mm.audio_config is not None:
        with torch.device("meta"):
            tower = Gemma4AudioTower(AudioSpec.from_hf(mm.tower_config))
        out += [(_audio_hf_name(name), f"media.audio.{name}", tuple(t.shape)) for name, t in tower.state_dict().items()]
    return out
