"""Speculative decoding: Medusa heads, calibration, token trees and acceptance statistics."""

from .tree import Tree, build_tree, expected_accept_length

__all__ = ["Tree", "build_tree", "expected_accept_length"]
