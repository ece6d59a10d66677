"""Small user-facing tools that read a run directory (``sbtrain plot``)."""
