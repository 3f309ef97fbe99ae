"""Medical image input and output with geometry: `MedicalImage`, `read_image`, `write_mask`."""

from medfm.io.image import MedicalImage
from medfm.io.readers import read_image
from medfm.io.writers import write_image, write_mask

__all__ = ["MedicalImage", "read_image", "write_image", "write_mask"]
