"""A learnbench plugin package: one trainer, random search over the weights (`random_search.RandomSearch`)."""

from .random_search import RandomSearch

__all__ = ["RandomSearch"]
