"""The embedded simulated world: items, a hidden CTR oracle, a renderer and a click simulator."""
