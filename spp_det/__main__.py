"""``python -m spp_det STAGE ...`` (and ``torchrun --nproc_per_node=N -m spp_det STAGE ...``): the CLI."""
from spp_det.cli import main

main()
