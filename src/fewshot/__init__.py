"""fewshot: learn new image categories from a handful of examples.

Data flows one way: data -> episodes -> backbones/learners -> training/distill -> artifacts -> service.
"""

__version__ = "0.1.0"

CACHE_FORMAT_VERSION = 1
