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
DDP's gradient sync to the last pass of each step by itself. Neither does DeepSpeed:
pass ``backward=engine.backward`` and every pass but the last runs outside a
gradient-accumulation boundary (``AdversarialTrainer`` does this under a DeepSpeed
config).
"""

__all__: list[str] = []
