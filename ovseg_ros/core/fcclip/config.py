"""Architecture sizes of the FC-CLIP head (pixel decoder + masked-attention decoder).

Kept free of torch so the segmenter's config dataclass can import it cheaply. The defaults are the authors'
(``fcclip_convnext_large_eval_ade20k.yaml`` on top of Mask2Former's ``maskformer2_R50_bs16_50ep.yaml``);
tests shrink every size to build a narrow model that runs in milliseconds on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FCCLIPArch:
    """Sizes of the trained part of FC-CLIP. The CLIP itself is chosen by the segmenter's ``clip`` spec."""

    #: Channels of the pixel decoder, of the decoder queries and of the mask embeddings (CONVS_DIM, HIDDEN_DIM).
    hidden_dim: int = 256
    #: Channels of the per-pixel mask features (MASK_DIM); equal to ``hidden_dim`` in every released model.
    mask_dim: int = 256
    #: Object queries of the decoder (NUM_OBJECT_QUERIES).
    num_queries: int = 250
    #: Masked-attention decoder layers (the authors' DEC_LAYERS is 10, minus the learnable-query step).
    dec_layers: int = 9
    dec_heads: int = 8
    dec_ffn_dim: int = 2048
    #: Deformable-attention encoder layers of the pixel decoder (TRANSFORMER_ENC_LAYERS).
    enc_layers: int = 6
    enc_heads: int = 8
    #: Sampling points per head and level of multi-scale deformable attention.
    enc_points: int = 4
    #: FFN width of the deformable encoder (hard-coded to 1024 by the authors).
    enc_ffn_dim: int = 1024
    #: GroupNorm groups in the pixel decoder (hidden_dim must be a multiple).
    gn_groups: int = 32
    #: Deformable-attention sampling: ``auto`` (the compiled MultiScaleDeformableAttention op on CUDA when
    #: importable, else grid_sample on CUDA and the embedding-bag gather on CPU), ``grid_sample`` or ``gather``.
    deform_kernel: str = "auto"

    def validate(self) -> None:
        if self.hidden_dim % self.gn_groups:
            raise ValueError(f"hidden_dim {self.hidden_dim} must be a multiple of gn_groups {self.gn_groups}")
        for heads, what in ((self.dec_heads, "dec_heads"), (self.enc_heads, "enc_heads")):
            if self.hidden_dim % heads:
                raise ValueError(f"hidden_dim {self.hidden_dim} must be a multiple of {what} {heads}")
        if min(self.num_queries, self.dec_layers, self.enc_layers, self.enc_points) < 1:
            raise ValueError("num_queries, dec_layers, enc_layers and enc_points must be >= 1")
        if self.deform_kernel not in ("auto", "grid_sample", "gather"):
            raise ValueError(f"deform_kernel must be 'auto', 'grid_sample' or 'gather', got {self.deform_kernel!r}")
