"""The online joiner: impressions + clicks from Kafka -> labeled examples for the trainer.

A process of its own beside ``trainer/`` (see docs/joiner.md): ``joiner.join`` is the pure,
Kafka-free join logic and ``joiner.process`` runs it against the topics.
"""
