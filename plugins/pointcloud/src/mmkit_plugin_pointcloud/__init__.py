"""mmkit point-cloud plugin: readers for .npy/.ply/.pcd/.xyz/.txt and a PointNet++ encoder.

Importing this package is cheap (no numpy, no torch); see :mod:`mmkit_plugin_pointcloud.plugin`.
"""

__version__ = "0.1.0"
