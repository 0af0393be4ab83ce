"""jaxbn experiments: runnable studies of batch norm, layer norm and dropout."""
