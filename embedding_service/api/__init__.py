"""HTTP layer: routes, dependencies, error mapping and request limits."""
