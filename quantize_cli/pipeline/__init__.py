"""Checkpoint -> quanta folder: source (read headers and tensors), plan, convert (stream), writer, inspect."""

from .convert import ConvertResult, convert
from .inspect import Inspection, inspect_folder
from .recipe import Recipe, build_recipe, load_recipe

__all__ = ["ConvertResult", "Inspection", "Recipe", "build_recipe", "convert", "inspect_folder", "load_recipe"]
