"""The HTTP layer: thin routes (``routes/<resource>.py``) over the service modules."""
