"""An institution"s side: its YAML (:mod:`.config`), its data read end to end (:mod:`.load`), its
image cache (:mod:`.cache`), what it allows (:mod:`.policy`), ``arkfed validate`` (:mod:`.validate`).
May import :mod:`arkfed.datasets`, :mod:`arkfed.model`, :mod:`arkfed.data` and the vocabulary."""

from arkfed import _moved

_MOVED = {
    "SiteConfig": "arkfed.site.config",
    "ComputeSettings": "arkfed.site.config",
    "load_site_config": "arkfed.site.config",
    "LabelPolicies": "arkfed.site.config",
    "Site": "arkfed.site.load",
    "load_site": "arkfed.site.load",
    "site_schema": "arkfed.site.load",
}

__getattr__ = _moved.package_getattr(__name__, _MOVED)  # the flat module arkfed.site of arkfed <= 0.1
