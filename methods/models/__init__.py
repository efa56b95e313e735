"""Models: importing this package registers every architecture in ``MODELS``.

=================  ===============================================================  ==========
name               paper / official code                                            arch args
=================  ===============================================================  ==========
preactresnet18     N-FGSM, FGSM-RS (``final_bn=True``); Batch-in-Batch PRN18         final_bn,
                   (``final_bn=False``)                                             preact_shortcut
wrn                N-FGSM WRN-28-10 (``variant="meliketoy"``); BB WRN28             depth, widen_factor,
                   (``variant="bearpaw"``); dropout 0.3 in both                     dropout, variant, conv_init
smallcnn           Selective-AT MNISTNet                                            none
resnet32           CIFAR-LT ResNet-32 (LDAM-DRW / MW-Net / IADA)                    normed_head
resnet18_sat       Selective-AT CIFAR-10 torchvision ResNet-18                      none
=================  ===============================================================  ==========

Use :func:`build_model`; see :mod:`methods.models.core` for the contract.
"""
from .core import (CIFAR_IMAGE_SIZES, Normalize, NormalizedModel, NormedLinear, arch_defaults,
                   build_model, scale_channels)
from . import preact_resnet, wide_resnet, small_cnn, resnet_cifar, resnet_tv  # noqa: F401  (register)

__all__ = ["CIFAR_IMAGE_SIZES", "Normalize", "NormalizedModel", "NormedLinear", "arch_defaults",
           "build_model", "scale_channels"]
