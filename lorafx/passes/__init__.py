"""fx passes. Each is a pure function ``GraphModule -> PassResult`` in its own file."""

from lorafx.passes.find_sites import LinearSite, find_sites
from lorafx.passes.insert_adapters import insert_adapters

__all__ = ["LinearSite", "find_sites", "insert_adapters"]
