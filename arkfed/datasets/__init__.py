"""The built-in dataset plugins, one module per dataset (shipped in the wheel).

Each module registers its plugin with :func:`arkfed.plugins.register_dataset`; discovery imports
every module here, and ``pyproject.toml`` also declares each under the ``arkfed.datasets`` entry
point group, the same way an installed contributor package declares its own. Nothing here is
imported by name elsewhere: adding a dataset means adding a module (see CONTRIBUTING.md).
"""
