"""What a trained model is: backbones and their frozen prefix (backbones), the head (classifier), the joined network
(network), its metrics, temperature and review threshold (metrics, calibration), the unknown-code scores
(unknown), the precedent index (precedents) and the saved model folder every door loads (bundle; package is the
shim for models logged before bundle existed). Imports hsflow.data and hsflow.core."""
