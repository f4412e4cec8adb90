"""arkfed: train medical-imaging foundation models by accruing knowledge across sites (Ark, federated).

Heavy libraries (torch, timm, flwr) are imported lazily by the modules that need them, so that
``arkfed --help`` and the data-only commands start fast.
"""

__version__ = "0.1.0"
