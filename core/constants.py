"""Input constants of the three tasks (torch-free: the task registry and the app's Home page import
them without loading torch)."""
from __future__ import annotations

# Pneumonia: the shared Kermany copy was stretched to 224x224 (aspect not kept), so every input is
# stretched the same way, then down-sampled to the model's size.
XRAY_SIZE = 128

# Cardiac: the shared ACDC copy has no true voxel spacing, so the field of view is normalised by a
# centred crop (the heart sits near the centre of short-axis cine planning) instead of by resampling.
CARDIAC_SIZE = 112
# Eight slices spread over the whole stack (base to apex): areas summed over them track each
# ventricle's volume, which the diagnosis rests on (ejection fraction, wall-to-cavity ratio).
CARDIAC_SLICES = 8
CARDIAC_CROP_FRACTION = 0.6
CARDIAC_SLICE_RANGE = (0.0, 1.0)

# Atrium: the MSD data has true spacing; inputs are resampled in-plane to the training spacing.
ATRIUM_SPACING_MM = 1.25
ATRIUM_GRID_RANGE_MM = (0.5, 5.0)  # in-plane grids a model may be trained and run at
ATRIUM_CONTEXT = 1  # neighbouring slices each side given as extra channels (2.5D)
UNET_MULTIPLE = 16

# One wording of the research-use disclaimer for the pages and the PDF reports.
DISCLAIMER = ("Research software, not a medical device: not validated for clinical use; "
              "do not base clinical decisions on it.")
