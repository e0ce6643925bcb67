"""The floor everything stands on: where the config tree lives (config), decoding photos safely (images), the HS
nomenclature and roll-up (hs + nomenclature/), which runtime answers (runtime), stage clocks (timing).
Imports nothing else of hsflow."""
