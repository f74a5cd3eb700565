"""Demos that run on a laptop CPU in seconds: `alignkit demo`."""
