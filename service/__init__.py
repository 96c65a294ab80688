"""The HTTP scoring service: FastAPI over the latest Redis snapshot."""
