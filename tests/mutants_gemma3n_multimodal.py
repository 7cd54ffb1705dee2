"""Known Gemma 3n image-audio-text porting bugs, each as an HF-compatible candidate class.

As in :mod:`tests.mutants_gemma4_multimodal`: every mutant subclasses HF's ``Gemma3nForConditionalGeneration``
and breaks its own instance (an attribute of one submodule, or a bound ``forward`` / method with one knob
turned); parameter names stay HF's (and timm's), so the state dict loads strictly and the gate's hooks sit
where they sit in HF. Building one needs timm (``tox -e timm``). ``EXPECTED``: the first probe that must
diverge. ``SOURCE``: ``m3n:N`` = ``transformers/models/gemma3n/modeling_gemma3n.py`` line N (5.23),
``mnv5:N`` = ``timm/models/mobilenetv5.py`` line N (1.0.31).

Tiny geometry (configs/gemma-3n-e2b-mm-tiny.json): 192 px images; MobileNet-V5 at channel multiplier 0.25,
84 blocks (3 edge residuals, then inverted residuals from block 3 on, attention blocks in stages 2-3); the
fusion reads blocks 44 (12 x 12) and 83 (6 x 6) and pools to 4 x 4 = 16 tokens; 12 placeholders per clip.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Gemma3nForConditionalGeneration

from tests.mutant_tools import bind as _bind

MODEL = "gemma-3n-e2b-mm-tiny"


class _Mutant(Gemma3nForConditionalGeneration):
    MODEL = MODEL
    BF16 = True

    @property
    def timm_model(self):
        return self.model.vision_tower.timm_model


class StemSymmetricPadding(_Mutant):
    EXPECTED = "vision.embed"
    BUG = "the stride-2 stem convolution padded 1 on every side instead of timm's 'same' (0 before, 1 after)"
    SOURCE = "mnv5:501-511, timm/layers/padding.py pad_same"

    def __init__(self, config):
        super().__init__(config)
        conv = self.timm_model.conv_stem.conv
        _bind(conv, lambda self, x: F.conv2d(x, self.weight, self.bias, stride=2, padding=1))


class LayerScaleIgnored(_Mutant):
    EXPECTED = "vision.layers.3.out"  # blocks 0-2 are edge residuals, without layer scale
    BUG = "the blocks' layer scale (a learned per-channel gain on the branch) left out"
    SOURCE = "mnv5:895 (layer_scale_init_value), timm/layers/layer_scale.py LayerScale2d"

    def __init__(self, config):
        super().__init__(config)
        for stage in self.timm_model.blocks:
            for block in stage:
                if hasattr(getattr(block, "layer_scale", None), "gamma"):
                    _bind(block.layer_scale, lambda self, x: x)  # the gamma still loads, unused


class FusionBilinearUpsampling(_Mutant):
    EXPECTED = "vision.pool"
    BF16 = False  # bf16: vision.pool at 0.49 of its limit (the fusion's norm and 3 x 3 pooling smooth it): gated in fp32
    BUG = "the fusion adapter upsampling the coarser stage bilinearly instead of nearest"
    SOURCE = "mnv5:104-110"

    def __init__(self, config):
        super().__init__(config)
        self.timm_model.msfa.interpolation_mode = "bilinear"


def _fusion_norm_before_pool(self, inputs):
    """timm's MobileNetV5MultiScaleFusionAdapter.forward (mnv5:102-133) with its norm moved before the pooling."""
    high = inputs[0].shape[-2:]
    resized = [F.interpolate(x, size=high, mode=self.interpolation_mode) if x.shape[-2] < high[0] else x for x in inputs]
    x = self.norm(self.ffn(torch.cat(resized, dim=1)))
    stride = (high[0] // self.output_resolution[0], high[1] // self.output_resolution[1])
    return F.avg_pool2d(x, kernel_size=stride, stride=stride)


class FusionNormBeforePool(_Mutant):
    EXPECTED = "vision.pool"
    BUG = "the fusion adapter's RMSNorm applied before the pooling to the output grid instead of after it"
    SOURCE = "mnv5:115-133"

    def __init__(self, config):
        super().__init__(config)
        _bind(self.timm_model.msfa, _fusion_norm_before_pool)


class EmbedVisionSoftNormMissing(_Mutant):
    EXPECTED = "vision.proj"
    BUG = "embed_vision's soft-embedding RMSNorm (with its gain) left out before the projection"
    SOURCE = "m3n:1906-1913"

    def __init__(self, config):
        super().__init__(config)
        _bind(self.model.embed_vision.soft_embedding_norm, lambda self, x: x)


class HardTokensFromTextTable(_Mutant):
    EXPECTED = "merge"
    BUG = "hard vision tokens (ids past the text part, <eoi> among them) embedded by the text table, not embed_vision"
    SOURCE = "m3n:2067-2077"

    def __init__(self, config):
        super().__init__(config)
        table = self.model.language_model.embed_tokens
        original = self.model.embed_vision.forward

        def forward(input_ids=None, inputs_embeds=None):  # the table's lookup, not a second call of its module
            if input_ids is None:
                return original(inputs_embeds=inputs_embeds)
            return F.embedding(input_ids, table.weight, table.padding_idx) * table.embed_scale.to(table.weight.dtype)

        self.model.embed_vision.forward = forward


class ImageTokensOneSlotOff(_Mutant):
    EXPECTED = "merge"
    BUG = "the image soft tokens merged one slot late (the placeholder mask shifted by one)"
    SOURCE = "m3n:1962-2000, m3n:2089-2094"

    def __init__(self, config):
        super().__init__(config)
        original = self.model.get_placeholder_mask

        def get_placeholder_mask(input_ids=None, inputs_embeds=None, image_features=None, audio_features=None):
            image, audio = original(input_ids, inputs_embeds=inputs_embeds, image_features=image_features,
                                    audio_features=audio_features)
            return torch.roll(image, 1, dims=1), audio

        self.model.get_placeholder_mask = get_placeholder_mask


class AudioTailZeros(_Mutant):
    EXPECTED = "merge"
    BUG = "a clip's padding frames and the tail up to 188 placeholders filled with zeros, not the last audio token's embedding"
    SOURCE = "m3n:2102-2120"

    def __init__(self, config):
        super().__init__(config)
        original = self.model.embed_audio.forward

        def forward(input_ids=None, inputs_embeds=None):
            out = original(input_ids=input_ids, inputs_embeds=inputs_embeds)
            return torch.zeros_like(out) if input_ids is not None and input_ids.numel() == 1 else out

        self.model.embed_audio.forward = forward


class PerLayerInputFromTextEmbedding(_Mutant):
    EXPECTED = "layers.0.ple_input"
    BUG = "the per-layer projection fed the text embedding instead of the merged one (media positions read their placeholders)"
    SOURCE = "m3n:2123-2128, m3n:1758-1783"

    def __init__(self, config):
        super().__init__(config)
        lm = self.model.language_model
        seen = {}
        lm.embed_tokens.register_forward_hook(lambda _m, _a, out: seen.__setitem__("embed", out))
        original = lm.project_per_layer_inputs

        def project_per_layer_inputs(inputs_embeds, per_layer_inputs=None):
            return original(seen["embed"], per_layer_inputs)

        lm.project_per_layer_inputs = project_per_layer_inputs


MUTANTS = [StemSymmetricPadding, LayerScaleIgnored, FusionBilinearUpsampling, FusionNormBeforePool,
           EmbedVisionSoftNormMissing, HardTokensFromTextTable, ImageTokensOneSlotOff, AudioTailZeros,
           PerLayerInputFromTextEmbedding]
