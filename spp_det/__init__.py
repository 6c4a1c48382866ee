"""spp-det: SPP-net object detection (He et al., 2014) in Python.

Modules follow the data flow: data -> proposals -> features (backbone, scales, projection,
pyramid pooling) -> heads (fc, SVM, box regressor) -> stages -> evaluation -> detection -> cli.
"""

__version__ = "0.1.0"
