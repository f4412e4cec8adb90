"""A site's Flower side: the ClientApp (:mod:`.client_app`) calling :mod:`arkfed.ark.tasks`, the SuperNode
(:mod:`.node`), the site's own heads and run state (:mod:`.heads`) and its task launcher (:mod:`.executor`)."""
