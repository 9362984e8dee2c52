"""Framework adapters, installed as ``advgraph.adapters``.

Each sub-package translates the framework-agnostic methods of advgraph to one
framework. They are imported lazily by :func:`advgraph.wrap`.
"""
