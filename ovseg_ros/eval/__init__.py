"""Evaluation of the segmenters on standard datasets (``ovseg-eval``), on the same core as the node.

* :mod:`.datasets` - readers of the standard on-disk layouts (one interface)
* :mod:`.metrics` - mIoU, per-class IoU, pixel and mean accuracy from one confusion matrix
* :mod:`.panoptic` - PQ / SQ / RQ (COCO panoptic definition)
* :mod:`.distributed` - sharding and exact reductions with torch.distributed (torchrun)
* :mod:`.runner` - the resumable evaluation loop; :mod:`.report` - JSON / Markdown; :mod:`.cli` - the command
"""
