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
vgg19_bn           Batchout extension's VGG19-BN (Hrushikesh-github/Batchout-       order, tied
                   Robustness-method); untied by default, ``tied=True`` its
                   weight-tied original; Conv-ReLU-BN by default
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
vgg19_bn           input, stage1..stage5 (``features.2/5/10/15/20``, the five max-pools; x2, x4,
                   x8, x16, x32), features (``flatten``)
=================  ===========================================================================

Hidden layers (``model.hidden_layers``: each layer's output module and pre-activation module, the
insertion points of BatchOut) are declared by ``smallcnn`` (conv1, conv2, fc1) and ``vgg19_bn``
(conv1..conv16, pool1..pool5); nets built from ``nn.Sequential`` blocks with ``nn.ReLU`` modules
get theirs read off the structure (:func:`~methods.models.core.sequential_hidden_layers`); the
ResNets activate functionally and have none.

Use :func:`build_model`; see :mod:`methods.models.core` for the contract.
"""
from .core import (CIFAR_IMAGE_SIZES, FEATURES_STAGE, INPUT_STAGE, Backbone, GlobalAvgPool,
                   HiddenLayer, Normalize, NormalizedModel, NormedLinear, Stage, arch_defaults,
                   build_model, scale_channels)
from . import preact_resnet, wide_resnet, small_cnn, resnet_cifar, resnet_tv, vgg  # noqa: F401  (register)

__all__ = ["CIFAR_IMAGE_SIZES", "FEATURES_STAGE", "INPUT_STAGE", "Backbone", "GlobalAvgPool",
           "HiddenLayer", "Normalize", "NormalizedModel", "NormedLinear", "Stage", "arch_defaults",
           "build_model", "scale_channels"]
