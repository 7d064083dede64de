"""A SAM model prepared for inference, with a visible lifetime.

:class:`InferenceModel` is what a predictor runs: made from a
:class:`~segany.modeling.Sam` (or SAM 2's :class:`~segany.modeling.sam2.Sam2`) and a
:class:`~segany.inference.precision.Precision`, it
holds everything derived from the weights that makes inference fast: the encoder with its
BatchNorm folded (:mod:`.folding`, optionally compiled), the decoder's lower-precision copy
on a CPU, the grid encoding, and the :class:`~.mask_decoder.FastMaskDecoder` with its
prepared weights. The model itself stays as it is (training and export use it).

It is made again when the weights change: every decode checks the decoder's tensors for
in-place edits (an optimiser step, ``load_state_dict``: a few microseconds), and
:meth:`InferenceModel.refresh`, which the predictor calls when an image is set, checks
the whole model, including replaced parameters and submodules. What was prepared per
image (:class:`~.mask_decoder.ImageSide`) records the :attr:`InferenceModel.generation`
it was made in, so that an image side made before a change is not used after it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..modeling import Sam
from ..modeling.mask_decoder import MaskDecoder
from ..modeling.sam2 import Sam2
from .compilation import compiled
from .folding import fold_batchnorm
from .mask_decoder import FastMaskDecoder, ImageSide
from .memory_attention import FastMemoryAttention
from .precision import Precision, cast_keeping_broadcast


class InferenceModel:
    """``model`` prepared for inference in ``precision`` (see the module documentation).

    Args:
        model: the model (SAM or SAM 2), on the device to run on.
        precision: the resolved precision.
        compile: run the image encoder through ``torch.compile``.
        fold: the decoder's attention forms (None: by cost; True/False forced, for tests).
    """

    def __init__(
        self,
        model: Sam | Sam2,
        precision: Precision,
        compile: bool = False,
        fold: bool | None = None,
    ) -> None:
        self.model = model
        self.precision = precision
        self.compile = compile
        self.fold = fold
        self.generation = 0
        self._prepare()

    # -- lifetime ----------------------------------------------------------------------

    def _prepare(self) -> None:
        """Make everything derived from the weights (again)."""
        model = self.model
        self._whole = _fingerprint(_tensors(model), identities=True)
        encoder = _ImageFeatures(model) if uses_high_res(model) else model.image_encoder
        encoder = fold_batchnorm(encoder)
        self.encoder = compiled(encoder) if self.compile else encoder
        # SAM 2's video memory attention (the tracker's costliest part), prepared likewise.
        self.memory_attention: FastMemoryAttention | None = None
        if isinstance(model, Sam2):
            # On a CPU in bfloat16, a copy in it (as the decoder's; see FastMemoryAttention).
            precision = self.precision
            dtype = precision.decoder_dtype if precision.casts_decoder else None
            self.memory_attention = FastMemoryAttention(model.memory_attention, dtype)
        self._decoder_tensors = _tensors(model.prompt_encoder, model.mask_decoder)
        self._decoder_state = _fingerprint(self._decoder_tensors)
        with torch.no_grad():
            self._prepare_decoder()
        self.generation += 1

    def _prepare_decoder(self) -> None:
        model, precision = self.model, self.precision
        decoder = model.mask_decoder
        if precision.casts_decoder:
            decoder = copy.deepcopy(decoder).to(precision.decoder_dtype).eval()
            decoder.requires_grad_(False)
        self.mask_decoder: nn.Module = decoder
        self.image_pe = precision.decoder_input(model.prompt_encoder.get_dense_pe())
        self.fast_decoder: FastMaskDecoder | None = None
        if isinstance(decoder, MaskDecoder):  # else an official-API decoder, called plainly
            no_mask = model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
            no_mask = no_mask.to(precision.decoder_input_dtype)
            self.fast_decoder = FastMaskDecoder(decoder, self.image_pe, no_mask, self.fold)

    def refresh(self) -> bool:
        """Prepare again if any weight changed since (a replaced parameter or submodule
        too); returns whether it did."""
        if _fingerprint(_tensors(self.model), identities=True) == self._whole:
            return False
        self._prepare()
        return True

    def _refresh_decoder(self) -> None:
        """Prepare the decoder again if its weights were edited in place since."""
        if _fingerprint(self._decoder_tensors) != self._decoder_state:
            self._prepare()

    # -- images ------------------------------------------------------------------------

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Preprocessed (B, 3, S, S) images -> float32 embeddings (B, C, h, w) and, for a
        decoder with high-resolution features, those projected for it, else None."""
        features = self.precision.encode(self.encoder, images)
        if isinstance(features, torch.Tensor):
            return features, None
        embedding, high_res = features
        if isinstance(self.model, Sam2):  # the image path's embedding (Sam2.encode_image)
            embedding = embedding + self.model.no_mem_embed.view(1, -1, 1, 1)
        return embedding, high_res

    def encode_frame(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """SAM 2 only: preprocessed (B, 3, S, S) video frames -> the float32 coarsest FPN
        level (B, C, h, w) as the tracker reads it (without ``no_mem_embed``, which
        :meth:`encode` adds) and the projected high-resolution levels."""
        if not isinstance(self.model, Sam2):
            raise TypeError("encode_frame is SAM 2's (video frames)")
        features = self.precision.encode(self.encoder, images)
        return features[0], features[1]

    def decoder_input(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) float32 features as the decoder reads them (its dtype,
        channels-last; see :meth:`Precision.decoder_input`)."""
        return self.precision.decoder_input(features)

    def prepare_image(
        self, embedding: torch.Tensor, high_res: list[torch.Tensor] | None = None
    ) -> ImageSide | None:
        """One image's decoder-ready (1, C, h, w) embedding (and high-resolution
        features) prepared for many decodes; None for an official-API decoder."""
        self._refresh_decoder()
        if self.fast_decoder is None:
            return None
        with torch.no_grad(), self.precision.decoder():
            side = self.fast_decoder.prepare_image(embedding, high_res)
        side.generation = self.generation
        return side

    def is_current(self, side: ImageSide | None) -> bool:
        """Whether ``side`` was prepared with the weights of now."""
        self._refresh_decoder()
        return side is not None and side.generation == self.generation

    # -- prompts -----------------------------------------------------------------------

    def decode(
        self,
        image_embeddings: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
        multimask_output: bool,
        high_res_features: list[torch.Tensor] | None = None,
        image: ImageSide | None = None,
        min_iou: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts in the model frame and decode them: float32 low-res mask logits
        (B, 3 or 1, 4h, 4w) and predicted IoU (B, 3 or 1).

        Args:
            image_embeddings: decoder-ready (1 or B, C, h, w) embeddings.
            points: (B, N, 2) coordinates and (B, N) labels, or None.
            boxes: (B, 4) XYXY boxes, or None.
            mask_input: (B, 1, 4h, 4w) low-res mask logits, or None.
            high_res_features: the decoder-ready high-resolution features, if used.
            image: the same image prepared by :meth:`prepare_image` (current), used when
                there is no mask prompt.
            min_iou: see :meth:`FastMaskDecoder.decode_image`.
        """
        self._refresh_decoder()
        precision = self.precision
        with torch.no_grad(), precision.decoder():
            sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
            if precision.casts_decoder:
                sparse = sparse.to(precision.decoder_dtype)
                dense = cast_keeping_broadcast(dense, precision.decoder_dtype)
            fast = self.fast_decoder
            if fast is None:
                masks, iou = self.mask_decoder(
                    image_embeddings=image_embeddings,
                    image_pe=self.image_pe,
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=multimask_output,
                )
            elif image is not None and mask_input is None:
                masks, iou = fast.decode_image(image, sparse, multimask_output, min_iou)
            else:
                masks, iou = fast.decode(
                    image_embeddings, sparse, dense, multimask_output, high_res_features, min_iou
                )
        return masks.float(), iou.float()


def uses_high_res(model: Sam | Sam2) -> bool:
    """Whether ``model``'s mask decoder also takes the image's high-resolution features
    (SAM 2's, segany's ``default``); an official-API decoder does not."""
    return bool(getattr(model.mask_decoder, "use_high_res_features", False))


class _ImageFeatures(nn.Module):
    """The encoder call of a model whose decoder takes high-resolution features: its
    ``encode_image``, (B, 3, S, S) -> (embedding, [projected 1/4 and 1/8 features]).

    The model says what its embedding is, except SAM 2's: its coarsest FPN level itself,
    which video frames are tracked on (:meth:`InferenceModel.encode` adds
    ``no_mem_embed`` for the image path, the same float32 addition ``encode_image``
    makes). A module around it, so that it can be folded and compiled.
    """

    def __init__(self, model: Sam | Sam2) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model = self.model
        if isinstance(model, Sam2):
            fine, medium, coarse = model.image_encoder(images).backbone_fpn
            return coarse, model.sam_mask_decoder.project_high_res([fine, medium])
        embeddings, high_res = model.encode_image(images)
        assert high_res is not None  # made only for a model that uses them
        return embeddings, high_res


def _tensors(*modules: nn.Module) -> list[torch.Tensor]:
    return [t for module in modules for t in (*module.parameters(), *module.buffers())]


def _fingerprint(tensors: list[torch.Tensor], identities: bool = False) -> list[Any]:
    """What changes when one of ``tensors`` is edited in place or given new memory; with
    ``identities``, also when one is replaced by another tensor."""
    if identities:
        return [(id(t), t.data_ptr(), t._version) for t in tensors]
    return [(t.data_ptr(), t._version) for t in tensors]
