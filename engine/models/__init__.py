"""Network definitions, one per file, built without random initialisation and loaded from checkpoints."""
