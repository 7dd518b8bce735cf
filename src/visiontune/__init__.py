"""visiontune: fine-tune image classifiers with the inputs of Azure ML's image components."""

__version__ = "0.1.0"
