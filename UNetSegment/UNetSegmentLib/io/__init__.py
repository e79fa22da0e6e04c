"""Reading, writing and fetching volumes (files on disk <-> :class:`UNetSegmentLib.image.Image`)."""
