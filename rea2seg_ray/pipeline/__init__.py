"""The Ray layer: the segmentation job as a Ray Data graph (decode tasks, discovery and scorer actor pools)."""
