"""The network: the timm backbone + projector (:mod:`.ark`), site heads, weight files (:mod:`.weights`)
and released Ark checkpoints (:mod:`.released`). May import :mod:`arkfed.data` and the vocabulary."""

from arkfed import _moved

_MOVED = {
    "ArkModel": "arkfed.model.ark",
    "SiteHead": "arkfed.model.ark",
    "find_pretrained_weights": "arkfed.model.ark",
    "create_backbone": "arkfed.model.ark",
    "create_projector": "arkfed.model.ark",
    "ModelSpec": "arkfed.spec",
}

__getattr__ = _moved.package_getattr(__name__, _MOVED)  # the flat module arkfed.model of arkfed <= 0.1
