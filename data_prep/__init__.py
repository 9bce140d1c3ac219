"""Data preparation: audio -> log-mel features -> WebDataset shards + dataset.json.

Library functions with thin CLIs (each `python -m data_prep.<name> --help`):
- data_prep.dmelodies.prepare_dmelodies: dMelodies melodies rendered with FluidSynth;
- data_prep.folder.prepare_folder: any folder of labelled recordings (e.g. URMP stems);
- data_prep.verify.verify_dataset: check every shard against its manifest.
Outputs are local folders or s3://bucket/prefix (through tsdsae.storage).
"""
