"""The export engine: which rank writes which piece (specs.py), the file plan, coverage check, the collective
writer, the export directory protocol, and plans for virtual ranks (no model needed)."""
