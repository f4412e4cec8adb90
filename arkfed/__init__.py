"""arkfed: train medical-imaging foundation models by accruing knowledge across sites (Ark, federated).

The package, bottom to top (each layer imports only the layers below it; ``tests/test_architecture.py``
checks it with import-linter):

- vocabulary: :mod:`.errors`, :mod:`.io` (atomic writes), :mod:`.config` (the run configuration),
  :mod:`.spec` (the model spec), :mod:`.schedules`, :mod:`.devices`
- :mod:`.data`: tables, label schema, image decoding, the prepared-image cache, views, loaders
- :mod:`.datasets`: the plugin API (one import point) and the built-in dataset plugins
- :mod:`.model`: the Ark model (timm backbone + projector), site heads, weight formats
- :mod:`.site`: a site's YAML, its loaded data, its cache, its policy, validation
- :mod:`.ark`: the method: one site visit, losses, metrics, the update gate, DDP, the site's tasks
- :mod:`.run`: the one loop, run folders, recipes, callbacks; :mod:`.demo`: the synthetic federation
- :mod:`.federation` (Flower transport) and :mod:`.evaluation` (reusing a model), side by side
- :mod:`.benchmarking`, then :mod:`.cli` on top

Heavy libraries (torch, timm, flwr) are imported lazily by the modules that need them, so that
``arkfed --help`` and the data-only commands start fast.
"""

from arkfed import _moved

__version__ = "0.1.0"

_moved.install()
