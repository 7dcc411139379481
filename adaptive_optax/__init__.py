"""adaptive_optax: optax transformations that get stuck training runs unstuck."""
