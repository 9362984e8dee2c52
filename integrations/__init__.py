"""Integrations with training frameworks, installed as ``advgraph.integrations``.

They sit beside the adapters and use them; each module imports its framework
lazily (importing this package imports none) and raises ImportError naming the
pip extra when it is missing:

- ``advgraph.integrations.transformers``: ``AdversarialTrainer`` (a
  ``transformers.Trainer``) and ``AdversarialTrainerMixin`` for Trainer subclasses
  (``pip install 'advgraph[transformers]'``).
- ``advgraph.integrations.lightning``: ``adversarial_step`` for a
  manual-optimization ``LightningModule`` (``pip install 'advgraph[lightning]'``).

Plain PyTorch DDP / FSDP need no integration: ``wrapped.adversarial_step`` defers
DDP's gradient sync to the last pass of each step by itself.
"""

__all__: list[str] = []
