"""The service's routes, one module per resource; ``service.app`` assembles them."""
