"""Evaluation-time defences: Mixup Inference and the input-transform baselines of its paper.

A defence wraps a trained model into a *defended predictor* at evaluation time only; nothing is
trained.  The package is split so that the config layer never imports torch:

* :mod:`methods.defenses.specs` -- the torch-free spec of every defence (fields, defaults,
  labels) and of the attacks run against defences (``labels``, ``modes``, ``eot_samples``),
  imported by :mod:`methods.config` while the DAG is built;
* :mod:`methods.defenses.base` -- the torch seam: :class:`~methods.defenses.base.Defense`,
  the defended predictor as a module (:class:`~methods.defenses.base.DefendedModel`) and the
  sampling pool (:func:`~methods.defenses.base.build_pool`);
* :mod:`methods.defenses.mixup_inference` -- MI-PL, MI-OL, MI-Combined (Pang, Xu, Zhu, ICLR
  2020);
* :mod:`methods.defenses.input_transforms` -- Gaussian noise, random rotation, Xie et al.
  (2018) and Guo et al. (2018), and the identity (no defence, for checks).

The torch modules register their classes in :data:`methods.registry.DEFENSES` when imported
(:mod:`methods.evaluation` imports them); this ``__init__`` imports nothing, so importing
``methods.defenses.specs`` stays torch-free.
"""
