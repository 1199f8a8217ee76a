"""Engines beyond the local one (`lungmask_kit.engine`): each drives the same job units elsewhere."""
