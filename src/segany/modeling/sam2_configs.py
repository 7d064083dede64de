"""SAM 2's image encoder sizes: Hiera tiny, small, base+ and large.

The values are those of Meta's ``sam2`` configs (``configs/sam2/sam2_hiera_*.yaml`` and
``configs/sam2.1/sam2.1_hiera_*.yaml``, with ``Hiera``'s defaults where a yaml leaves a
field out). SAM 2.0 and 2.1 have the same image encoder in every size; they differ only
in the parts after it. ``tests/test_sam2_encoder.py`` reads the yaml files and checks
every field here against them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sam2EncoderConfig:
    """One SAM 2 image encoder: a Hiera trunk and an FPN neck.

    Each stage after the first halves the resolution (query pooling in its first block)
    and doubles the channels and heads, so the trunk's per-stage channels follow from
    ``embed_dim`` (:attr:`backbone_channel_list`).

    Attributes:
        embed_dim: channels of the first stage (stride 4).
        num_heads: attention heads of the first stage.
        stages: blocks per stage.
        global_att_blocks: indices (over all blocks) of the blocks with global attention;
            the others attend within windows.
        window_spec: window size per stage (in that stage's tokens).
        window_pos_embed_bkg_spatial_size: (h, w) of the learned "background" position
            embedding, resized to the token grid before the windowed one is tiled onto it.
        fpn_top_down_levels: the FPN levels (0 = finest) that add the upsampled coarser
            level; the others keep their lateral projection only.
        scalp: the coarsest levels dropped from the encoder's outputs (they still feed the
            top-down path).
        d_model: the neck's output channels.
        fpn_interp_mode: how the top-down path upsamples (``F.interpolate``'s mode).
    """

    embed_dim: int
    num_heads: int
    stages: tuple[int, ...]
    global_att_blocks: tuple[int, ...]
    window_spec: tuple[int, ...]
    window_pos_embed_bkg_spatial_size: tuple[int, int]
    fpn_top_down_levels: tuple[int, ...] = (2, 3)
    scalp: int = 1
    d_model: int = 256
    fpn_interp_mode: str = "nearest"

    @property
    def stage_channels(self) -> tuple[int, ...]:
        """The trunk's channels per stage, finest first (96, 192, 384, 768 for tiny)."""
        return tuple(self.embed_dim * 2**stage for stage in range(len(self.stages)))

    @property
    def backbone_channel_list(self) -> tuple[int, ...]:
        """The neck's input channels, coarsest first, as Meta's configs list them."""
        return self.stage_channels[::-1]


SAM2_ENCODER_CONFIGS: dict[str, Sam2EncoderConfig] = {
    "hiera_tiny": Sam2EncoderConfig(
        embed_dim=96,
        num_heads=1,
        stages=(1, 2, 7, 2),
        global_att_blocks=(5, 7, 9),
        window_spec=(8, 4, 14, 7),
        window_pos_embed_bkg_spatial_size=(7, 7),
    ),
    "hiera_small": Sam2EncoderConfig(
        embed_dim=96,
        num_heads=1,
        stages=(1, 2, 11, 2),
        global_att_blocks=(7, 10, 13),
        window_spec=(8, 4, 14, 7),
        window_pos_embed_bkg_spatial_size=(7, 7),
    ),
    "hiera_base_plus": Sam2EncoderConfig(
        embed_dim=112,
        num_heads=2,
        stages=(2, 3, 16, 3),
        global_att_blocks=(12, 16, 20),
        window_spec=(8, 4, 14, 7),
        window_pos_embed_bkg_spatial_size=(14, 14),
    ),
    "hiera_large": Sam2EncoderConfig(
        embed_dim=144,
        num_heads=2,
        stages=(2, 6, 36, 4),
        global_att_blocks=(23, 33, 43),
        window_spec=(8, 4, 16, 8),
        window_pos_embed_bkg_spatial_size=(7, 7),
    ),
}
