"""Known Gemma 4 image/audio porting bugs, each as an HF-compatible candidate class.

As in :mod:`tests.mutants_multimodal`: every mutant subclasses HF's ``Gemma4ForConditionalGeneration``
and breaks its own instance (a bound ``forward``, a private config, its own masks); parameter names
stay HF's, so the state dict loads strictly and the gate's hooks see the same places. ``EXPECTED``:
the first probe that must diverge. ``SOURCE``: ``notes §5.5 #n`` = /work/shared/notes/hf-gemma-4-numerics.md
section 5.5 (and 5.2 for #32); ``issue 13`` = the issue that asked for the suite.

``WrongSoftTokenCount`` is not a divergence but a count mismatch: HF refuses to merge, and the gate
must report it as that run's one-line error (``tests/test_multimodal_gemma4.py``).
"""

from __future__ import annotations

import torch
from transformers import Gemma4ForConditionalGeneration

from tests.mutant_tools import bind as _bind
from tests.mutant_tools import image_block_masks as _image_block_masks
from tests.mutant_tools import private_config as _private_config

E2B = "gemma-4-e2b-mm-tiny"  # clipped linears, an audio tower, causal media tokens
B31 = "gemma-4-31b-mm-tiny"  # standardised, images bidirectional on sliding layers


class _Mutant(Gemma4ForConditionalGeneration):
    MODEL = E2B
    BF16 = True


class VisionRope1D(_Mutant):
    MODEL = B31
    EXPECTED = "vision.layers.0.out"
    BUG = "1D RoPE over the flattened patch index instead of 2D RoPE (columns on one half, rows on the other)"
    SOURCE = "issue 13"

    def __init__(self, config):
        super().__init__(config)
        rotary = self.model.vision_tower.encoder.rotary_emb
        original = rotary.forward

        def forward(x, position_ids):
            width = position_ids[..., 0].max(dim=-1, keepdim=True).values + 1
            flat = position_ids[..., 1] * width + position_ids[..., 0]
            flat = torch.where(position_ids[..., 0] < 0, -1, flat)
            return original(x, torch.stack([flat, flat], dim=-1))

        rotary.forward = forward


class VisionClipsIgnored(_Mutant):
    EXPECTED = "vision.layers.0.out"
    BUG = "the vision tower's clipped linears loaded without applying their clip bounds"
    SOURCE = "notes §5.5"

    def __init__(self, config):
        super().__init__(config)
        for module in self.model.vision_tower.modules():
            if hasattr(module, "use_clipped_linears"):
                module.use_clipped_linears = False


class VisionPoolNotScaled(_Mutant):
    EXPECTED = "vision.pool"
    BUG = "the pooled vision features not multiplied by sqrt(vision width)"
    SOURCE = "notes §2.1"

    def __init__(self, config):
        super().__init__(config)
        self.model.vision_tower.pooler.root_hidden_size = 1.0


class VisionNotStandardized(_Mutant):
    MODEL = B31
    EXPECTED = "vision.pool"
    BUG = "the 26B/31B vision tower's standardisation ((h - std_bias) * std_scale) skipped"
    SOURCE = "notes §2.1"

    def __init__(self, config):
        super().__init__(config)
        tower = self.model.vision_tower
        tower.config = _private_config(tower.config, standardize=False)


class EmbedVisionNormMissing(_Mutant):
    MODEL = B31
    EXPECTED = "vision.proj"
    BUG = "embed_vision's scale-free RMSNorm before the projection left out"
    SOURCE = "issue 13"

    def __init__(self, config):
        super().__init__(config)
        _bind(self.model.embed_vision.embedding_pre_projection_norm, lambda self, x: x)


class EmbedAudioNormMissing(_Mutant):
    EXPECTED = "audio.proj"
    BUG = "embed_audio's scale-free RMSNorm before the projection left out"
    SOURCE = "issue 13"

    def __init__(self, config):
        super().__init__(config)
        _bind(self.model.embed_audio.embedding_pre_projection_norm, lambda self, x: x)


class AudioResidualWeightIgnored(_Mutant):
    EXPECTED = "audio.layers.0.out"
    BUG = "the conformer's macaron feed-forward residual weight 0.5 ignored (x + FFN(x))"
    SOURCE = "notes §5.5 #58"

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.audio_tower.layers:
            layer.feed_forward1.post_layer_scale = layer.feed_forward2.post_layer_scale = 1.0


class PlaceholderPerLayerInput(_Mutant):
    EXPECTED = "layers.0.ple_input"
    BUG = "the per-layer embedding at image/audio positions looked up with the placeholder id instead of the pad id"
    SOURCE = "notes §5.2 #32"
    BF16 = False  # caught at its probe in bf16 too, but at 1.6x the limit, not the 3x a bf16 catch needs

    def __init__(self, config):
        super().__init__(config)
        inner, text = self.model, self.model.language_model
        original_forward, original_lookup = inner.forward, text.get_per_layer_inputs
        seen = {}

        def forward(*args, input_ids=None, **kwargs):
            seen["ids"] = input_ids
            return original_forward(*args, input_ids=input_ids, **kwargs)

        def get_per_layer_inputs(input_ids, inputs_embeds=None):
            return original_lookup(seen["ids"], inputs_embeds)

        inner.forward, text.get_per_layer_inputs = forward, get_per_layer_inputs


class CausalImages(_Mutant):
    MODEL = B31
    EXPECTED = "layers.0.attn"
    BUG = "mm_token_type_ids not passed: image tokens causal where the 31B config asks for bidirectional images"
    SOURCE = "notes §2.1"

    def forward(self, *args, mm_token_type_ids=None, **kwargs):
        return super().forward(*args, **kwargs)


class _OwnMasks(_Mutant):
    MODEL = B31
    GLOBAL_BLOCKS = False

    def forward(self, input_ids=None, attention_mask=None, mm_token_type_ids=None, **kwargs):
        dtype = next(self.parameters()).dtype
        masks = _image_block_masks(input_ids, attention_mask, (self.config.image_token_id, self.config.video_token_id),
                                   self.config.text_config.sliding_window, dtype, full_blocks=self.GLOBAL_BLOCKS)
        return super().forward(input_ids=input_ids, attention_mask=masks, **kwargs)


class OwnMasksControl(_OwnMasks):
    """No bug: the port's own masks with HF's Gemma 4 rule."""


class ImagesBidirectionalOnGlobalLayers(_OwnMasks):
    EXPECTED = "layers.5.attn"  # layers 0-4 are sliding (right), layer 5 the first global one
    BUG = "Gemma 3's mask rule kept: images bidirectional on global layers too (Gemma 4: sliding layers only)"
    SOURCE = "notes §2.1"
    GLOBAL_BLOCKS = True


class WrongSoftTokenCount(_Mutant):
    BUG = "one soft token too few per image (a pooling that drops the last pooled row)"
    SOURCE = "issue 13"

    def __init__(self, config):
        super().__init__(config)
        original = self.model.get_image_features

        def get_image_features(pixel_values, image_position_ids=None, **kwargs):
            out = original(pixel_values, image_position_ids, **kwargs)
            out.pooler_output = tuple(rows[:-1] for rows in out.pooler_output)
            return out

        self.model.get_image_features = get_image_features


MUTANTS = [VisionRope1D, VisionClipsIgnored, VisionPoolNotScaled, VisionNotStandardized, EmbedVisionNormMissing,
           EmbedAudioNormMissing, AudioResidualWeightIgnored, PlaceholderPerLayerInput, CausalImages,
           ImagesBidirectionalOnGlobalLayers]
CONTROLS = [OwnMasksControl]
