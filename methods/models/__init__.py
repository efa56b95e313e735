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

Every net is a :class:`Backbone` with named stages (``model.stage_names()``, in forward order;
``stageN`` is the output of the N-th residual stage / conv block, reductions relative to the input):

=================  ===========================================================================
name               stages of the built model (``NormalizedModel``)
=================  ===========================================================================
preactresnet18     input, stage1..stage4 (``layer1..4``; x1, x2, x4, x8), features (``pool``)
wrn                input, stage1..stage3 (``layer1..3``; x1, x2, x4), features (``pool``)
smallcnn           input, stage1 (conv1 + ReLU), stage2 (conv2 + ReLU), features (fc1 + ReLU)
resnet32           input, stage1..stage3 (``layer1..3``; x1, x2, x4), features (``pool``)
resnet18_sat       input, stage1..stage4 (``model.layer1..4``; x1, x2, x4, x8), features
                   (``flatten``)
=================  ===========================================================================

Use :func:`build_model`; see :mod:`methods.models.core` for the contract.
"""
from .core import (CIFAR_IMAGE_SIZES, FEATURES_STAGE, INPUT_STAGE, Backbone, GlobalAvgPool,
                   Normalize, NormalizedModel, NormedLinear, Stage, arch_defaults, build_model,
                   scale_channels)
from . import preact_resnet, wide_resnet, small_cnn, resnet_cifar, resnet_tv  # noqa: F401  (register)

__all__ = ["CIFAR_IMAGE_SIZES", "FEATURES_STAGE", "INPUT_STAGE", "Backbone", "GlobalAvgPool",
           "Normalize", "NormalizedModel", "NormedLinear", "Stage", "arch_defaults", "build_model",
           "scale_channels"]
