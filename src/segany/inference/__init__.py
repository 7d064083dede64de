"""The inference layer: what makes SAM fast, above the stateless model of ``modeling/``.

- :mod:`.model`: :class:`~.model.InferenceModel`, a model prepared for inference in one
  precision (folded encoder, decoder copy, prepared decoder weights), made again when the
  weights change; what the predictors run.
- :mod:`.mask_decoder`: :class:`~.mask_decoder.FastMaskDecoder` and the per-image
  :class:`~.mask_decoder.ImageSide` it decodes prompts against.
- :mod:`.transformer`, :mod:`.attention`: the two-way transformer's exact fast forms.
- :mod:`.folding`: BatchNorm folded into convolutions.
- :mod:`.postprocess`: the predictor's mask upscaling in one pass per axis.
- :mod:`.precision`: which dtype each part runs in; :mod:`.compilation`: ``torch.compile``.

May import ``modeling/`` and ``errors``, nothing else of segany.
"""
