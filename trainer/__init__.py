"""The online trainer: Kafka consumer, featurizer, CTR model, embedding tables, publisher."""
