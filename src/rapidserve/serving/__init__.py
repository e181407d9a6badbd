"""Serving topologies over the engine library: the rapid topology's workers live here."""
