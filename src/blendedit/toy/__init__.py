"""Shapes World: the project's synthetic image domain (../shared/SHAPES_WORLD.md)."""
