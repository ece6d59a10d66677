"""User-facing tools on top of the library: ``sbtrain plot`` (reads a run directory) and
``sbtrain spikestats`` (measures a checkpoint's neurons)."""
