"""Architectures only: CASIA-Net (``casia``), the regional ensemble of CASIA-Nets (``ensemble``), and the
face-identity encoder, dlib's ResNet in PyTorch (``encoder``), with dlib's file format (``dlib_format``)."""
from shared.ml import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "CASIANet": "casia", "create_model": "casia", "RegionalEnsemble": "ensemble", "crops_to_tensor": "ensemble",
    "prepare_for_inference": "ensemble", "load_encoder": "encoder", "encode": "encoder",
})
