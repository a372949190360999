"""Integrations with training frameworks, each imported on its own (``import lorafx`` imports none):
``lorafx.integrations.transformers`` (``LorafxTrainer``, ``LorafxCallback``)."""
