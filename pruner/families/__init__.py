"""Built-in block families; importing this package registers them."""
from updp.pruner.families import convnext, inverted_residual, resnet, vit  # noqa: F401
