"""The synthetic offline demo federation: sites in official dataset layouts (:mod:`.generate`) with
drawn findings (:mod:`.draw`). Not medical data. May import :mod:`arkfed.datasets` and below."""
