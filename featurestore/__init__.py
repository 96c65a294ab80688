"""Feature schema, ID encoding, the collisionless embedding table and the Redis snapshot store."""
