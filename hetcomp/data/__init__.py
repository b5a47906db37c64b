"""The package's data files: the committed Medusa heads, their plot, and the recorded responses
they were calibrated on. Ground floor: no imports but the standard library."""

import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def packaged_file(name: str) -> str:
    """Path of ``name`` in the package's data folder."""
    return os.path.join(_HERE, name)
