"""The ensemble's members and their aggregate: the identity member (a head on the face encoder's descriptors,
with the out-of-distribution reference), the gallery of diagnosed patients, and a model's prediction."""
from shared.ml import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "IdentityMember": "identity", "IdentityHead": "identity", "OODReference": "identity", "Gallery": "gallery",
    "Prediction": "model", "predict": "model",
})
