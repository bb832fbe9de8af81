"""Prompt vocabulary, query features, the prompt model and token selection."""
