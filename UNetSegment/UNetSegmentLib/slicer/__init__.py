"""3D Slicer adapters of the core: MRML ⇄ Image, scene builders, worker client, logic, panel, installer.

These modules import ``slicer``/``qt``/``vtk`` lazily (inside functions) or at module level where
only Slicer runs them; the core (everything in ``UNetSegmentLib`` outside this package) never
imports them. Under pytest they run against the stand-in in ``Testing/slicer_standin``.
"""
