"""Command-line tools for users of the project (each runs as ``python -m tools.<name>``):

- ``tools.inspect``: what a checkpoint (ours, ALBEF or BLIP) holds and which configs it fits.
- ``tools.check_dataset``: scan annotation JSONs against an image root and write a cleaned copy.
- ``tools.export_minilm``: copy the offline MiniLM BERT weights and bert-base-uncased vocabulary to a folder.
- ``tools.config_docs``: regenerate ``docs/config_reference.md`` from the config schemas.
"""
