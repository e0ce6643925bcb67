"""From rulings to samples: the raw store of rulings and photos (store), the synthetic demo (synth), datasets drawn
from the store (builder, quality), photo loading and augmentation (loading, transforms, datamodule), and the
frozen-prefix feature cache (features). Imports only hsflow.core."""
