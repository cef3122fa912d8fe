"""FC-CLIP in pure PyTorch (no detectron2, no compiled ops): model, checkpoint conversion, post-processing.

Yu et al., "Convolutions Die Hard: Open-Vocabulary Segmentation with Single Frozen Convolutional CLIP",
NeurIPS 2023 (arXiv 2308.02487), https://github.com/bytedance/fc-clip. The segmenter that uses this package
is :mod:`ovseg_ros.core.segmenters.fcclip`; :mod:`.model` lists where we deliberately differ from the
authors' code. Modules: ``config`` (sizes), ``backbone`` (open_clip ConvNeXt), ``msdeform_attn``,
``pixel_decoder``, ``decoder``, ``ensemble``, ``model``, ``preprocess``, ``postprocess``, ``convert``
(checkpoint names), ``coco_panoptic`` (the training vocabulary).
"""
