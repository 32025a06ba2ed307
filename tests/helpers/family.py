"""The 12 published SHI-Labs checkpoints of the family: registry name -> (the function of SHI-Labs' code
that builds the model, its number of classes)."""

PUBLISHED_FAMILY = {
    "dinat-s-tiny-in1k-224": ("dinat_s_tiny", 1000),
    "dinat-s-small-in1k-224": ("dinat_s_small", 1000),
    "dinat-s-base-in1k-224": ("dinat_s_base", 1000),
    "dinat-s-large-in22k-in1k-224": ("dinat_s_large", 1000),
    "dinat-s-large-in22k-in1k-384": ("dinat_s_large_384", 1000),
    "dinat-s-large-in22k-224": ("dinat_s_large_21k", 21841),
    "vitrpb-small-in1k-224": ("vitrpb_small", 1000),
    "nat-isotropic-small-in1k-224": ("nat_isotropic_small", 1000),
    "dinat-isotropic-small-in1k-224": ("dinat_isotropic_small", 1000),
    "vitrpb-base-in1k-224": ("vitrpb_base", 1000),
    "nat-isotropic-base-in1k-224": ("nat_isotropic_base", 1000),
    "dinat-isotropic-base-in1k-224": ("dinat_isotropic_base", 1000),
}
