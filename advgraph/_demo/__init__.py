"""``advgraph demo``: the implementation behind the command line (private).

Modules: ``data`` (loading, fixed split, tokenisation), ``settings``, ``run`` (the
driver and the evaluation attack, written once), ``torch_runner`` and
``keras_runner`` (the thin framework parts), ``report`` (table, summary, plot),
``cli`` (arguments). Nothing here imports a framework at import time.
"""
