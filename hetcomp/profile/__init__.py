"""ARCA: measurement harness (memory bandwidth now; op-class profiles follow)."""
