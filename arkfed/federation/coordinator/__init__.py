"""The coordinator's Flower side: the ServerApp (:mod:`.server_app`, the loop's ``FlowerSites``), the
SuperLink launcher and gateway, live status and the mailbox. Imports run and the shared federation modules."""
