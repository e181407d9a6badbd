"""The OpenAI-compatible server (`rapidserve serve`): protocol, routes, metrics."""
