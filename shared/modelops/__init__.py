"""The model lifecycle around the database: registry, feature store, retraining, gallery loading,
registering a trained model. :mod:`shared.ml` is the pure maths these call."""
