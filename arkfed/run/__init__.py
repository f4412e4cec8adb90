"""A run: the one Ark loop (:mod:`.loop`) over local (:mod:`.local`) or federated sites, its plan,
records, folder, recipes, provenance and callbacks (progress, trackers). May import ark and below."""
