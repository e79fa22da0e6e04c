"""UNetSegment core: U-Net lesion segmentation without Slicer.

Everything numeric lives here and imports in plain Python (no ``slicer``/``qt``).
"""
__version__ = "0.1.0"
