"""Known multimodal porting bugs, each as an HF-compatible candidate class (the multimodal mutation suite).

As in :mod:`tests.mutants`: every mutant subclasses HF's ``Gemma3ForConditionalGeneration`` and breaks
*its own instance* (a bound ``forward`` on one submodule, or its own attention masks); parameter names
stay as HF has them, so the state dict loads strictly and the gate's hooks see the same places.
``EXPECTED`` is the first probe that must diverge: the wrong operation itself (``vision.*`` on the
image path, ``merge`` for the soft tokens' placement, ``layers.{i}.attn`` for a wrong mask).
``SOURCE``: ``numerics §5.1 #n`` = /work/shared/notes/hf-gemma-1-3-numerics.md; ``issue 13`` = the
issue that asked for the suite. ``OwnMasksControl`` builds the image-block masks itself with the right
rule and must pass bit for bit: the mask mutants fail because of their rule, not the rewrite.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import Gemma3ForConditionalGeneration

from tests.mutant_tools import bind as _bind
from tests.mutant_tools import image_block_masks as _image_block_masks

MODEL = "gemma-3-4b-mm-tiny"


def _projector_forward(norm_first: bool = False, skip_norm: bool = False, column_major: bool = False):
    """Gemma3MultiModalProjector.forward as a porter writes it, with one choice turned."""

    def forward(self, vision_outputs):
        b, _, c = vision_outputs.shape
        grid = vision_outputs.transpose(1, 2).reshape(b, c, self.patches_per_image, self.patches_per_image)
        if column_major:  # patches read as (column, row)
            grid = grid.transpose(2, 3)
        grid = grid.contiguous()
        if norm_first:  # the soft-embedding norm on every patch, before the pooling
            grid = self.mm_soft_emb_norm(grid.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(grid.shape)
        pooled = self.avg_pool(grid).flatten(2).transpose(1, 2)
        if not (norm_first or skip_norm):
            pooled = self.mm_soft_emb_norm(pooled)
        return torch.matmul(pooled, self.mm_input_projection_weight).type_as(vision_outputs)

    return forward


def _wrap_image_features(model, change) -> None:
    """The soft tokens (images, N, H) the inner model merges are ``change(soft)``, on this instance only
    (the projector's own output, the ``vision.proj`` probe, stays right)."""
    inner = model.model
    original = inner.get_image_features

    def get_image_features(pixel_values, **kwargs):
        out = original(pixel_values, **kwargs)
        out.pooler_output = change(out.pooler_output)
        return out

    inner.get_image_features = get_image_features


class _Mutant(Gemma3ForConditionalGeneration):
    MODEL = MODEL
    BF16 = True


class NormBeforePooling(_Mutant):
    EXPECTED = "vision.pool"
    BUG = "the projector's soft-embedding RMSNorm applied to every patch before the 4x4 average pooling"
    SOURCE = "issue 13"

    def __init__(self, config):
        super().__init__(config)
        _bind(self.model.multi_modal_projector, _projector_forward(norm_first=True))


class ProjectorNormMissing(_Mutant):
    EXPECTED = "vision.proj"
    BUG = "the projector's soft-embedding RMSNorm left out (weight loaded, never applied)"
    SOURCE = "issue 13"

    def __init__(self, config):
        super().__init__(config)
        _bind(self.model.multi_modal_projector, _projector_forward(skip_norm=True))


class PatchesColumnMajor(_Mutant):
    EXPECTED = "vision.pool"
    BUG = "the patch sequence reshaped to the grid column-major before pooling (soft tokens transposed)"
    SOURCE = "issue 13"

    def __init__(self, config):
        super().__init__(config)
        _bind(self.model.multi_modal_projector, _projector_forward(column_major=True))


class NoPostLayerNorm(_Mutant):
    EXPECTED = "vision.post_norm"
    BUG = "the SigLIP tower's post_layernorm skipped before the projector"
    SOURCE = "numerics §5.1 #27"

    def __init__(self, config):
        super().__init__(config)
        _bind(self.model.vision_tower.post_layernorm, lambda self, x: x)


class NoPositionEmbedding(_Mutant):
    EXPECTED = "vision.embed"
    BUG = "the learned position table not added to the patch embeddings"
    SOURCE = "issue 13"

    def __init__(self, config):
        super().__init__(config)

        def forward(self, pixel_values, interpolate_pos_encoding=False):
            patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
            return patches.flatten(2).transpose(1, 2)

        _bind(self.model.vision_tower.embeddings, forward)


class VisionExactGelu(_Mutant):
    EXPECTED = "vision.layers.0.out"
    BUG = "exact-erf GELU in the SigLIP MLP instead of gelu_pytorch_tanh"
    SOURCE = "numerics §5.1 #4 (MM-vision)"
    BF16 = False

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.vision_tower.encoder.layers:
            layer.mlp.activation_fn = nn.GELU()


class SoftTokensScaled(_Mutant):
    EXPECTED = "merge"
    BUG = "the image soft tokens multiplied by sqrt(hidden) like the text embeddings"
    SOURCE = "numerics §5.1 #25"

    def __init__(self, config):
        super().__init__(config)
        _wrap_image_features(self, lambda soft: soft * math.sqrt(config.text_config.hidden_size))


class SoftTokensOneSlotOff(_Mutant):
    EXPECTED = "merge"
    BUG = "soft tokens merged one slot late (starting at the first placeholder + 1, the last over <end_of_image>)"
    SOURCE = "issue 13"

    def __init__(self, config):
        super().__init__(config)
        placeholder_mask = self.model.get_placeholder_mask

        def shifted(input_ids, inputs_embeds, image_features):
            mask = placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=image_features)
            return torch.roll(mask, shifts=1, dims=1)

        self.model.get_placeholder_mask = shifted


class ImagesMergedInReverse(_Mutant):
    EXPECTED = "merge"
    BUG = "the images' soft tokens placed in reverse order (the last image at the first image's placeholders)"
    SOURCE = "issue 13"

    def __init__(self, config):
        super().__init__(config)
        _wrap_image_features(self, lambda soft: soft.flip(0))


class CausalImageMask(_Mutant):
    EXPECTED = "layers.0.attn"
    BUG = "image tokens attend causally (token_type_ids dropped: no bidirectional image block)"
    SOURCE = "numerics §5.1 #23"

    def forward(self, *args, token_type_ids=None, **kwargs):
        return super().forward(*args, **kwargs)


class _OwnMasks(_Mutant):
    """A port that builds its own image-block masks (the rule below) and hands them to HF's model."""

    RULE = "and_window"  # AND(window, OR(causal, block)): HF's

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        dtype = next(self.parameters()).dtype
        masks = _image_block_masks(input_ids, attention_mask, (self.config.image_token_id,),
                                   self.config.text_config.sliding_window, dtype,
                                   window_over_blocks=self.RULE == "and_window")
        return super().forward(input_ids=input_ids, attention_mask=masks, **kwargs)


class OwnMasksControl(_OwnMasks):
    """No bug: the port's own masks with HF's rule."""


class SlidingWindowOrBlock(_OwnMasks):
    EXPECTED = "layers.0.attn"
    BUG = ("sliding layers: OR(sliding window, image block) instead of AND(window, OR(causal, block)), so an image "
           "token sees its whole image even beyond the window")
    SOURCE = "numerics §5.1 #29"
    RULE = "or_window"


MUTANTS = [NormBeforePooling, ProjectorNormMissing, PatchesColumnMajor, NoPostLayerNorm, NoPositionEmbedding,
           VisionExactGelu, SoftTokensScaled, SoftTokensOneSlotOff, ImagesMergedInReverse, CausalImageMask,
           SlidingWindowOrBlock]
CONTROLS = [OwnMasksControl]
