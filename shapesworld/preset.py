"""The world a run config asks for: its top-level ``x-synthetic`` section, read by the entry points
(run_pretrain.py, run_finetune.py) before the run starts; the run config's schema skips it (top-level
``x-`` keys are not part of a schema, see :func:`engine.config.load_config`).

    x-synthetic:          # generate the shapes world into root when it is not there
      root: data/shapes   # and any generator option (python -m shapesworld --help), e.g. seed: 1

``--set x-synthetic.seed=1`` changes an option, ``--set x-synthetic=null`` asks for nothing.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, Union

from engine.config import ConfigError, apply_overrides, load_config, read_yaml
from shapesworld.config import ShapesConfig
from shapesworld.write import ensure_shapes

SECTION = "x-synthetic"


def strings_in(node: Any) -> Iterator[str]:
    """Every string in a YAML node (a mapping's values, a list's items), depth first."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from strings_in(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings_in(v)


def _inside(path: str, folder: Path) -> bool:
    p = Path(path).resolve()
    return p == folder or folder in p.parents


def prepare(config: Union[str, os.PathLike], overrides: Sequence[str] = (),
            schema: Optional[type] = None) -> Optional[Dict[str, Any]]:
    """Generate the world that the YAML ``config`` (with the ``--set`` ``overrides``) asks for in its
    ``x-synthetic`` section, unless its root already holds it; the world's manifest, or None when the
    config asks for none or none of the paths its ``data`` section names lies in root (the run uses other
    data: nothing is generated). With ``schema`` (the run config's dataclass) the run config is checked
    first: a bad one is reported before any data is generated.

    Every process of a run may call it: the generator's folder lock serialises them and the later ones
    find the world complete. ``ConfigError`` names a bad section or option, and a file in root that the
    generator did not write (it is never written over)."""
    if schema is not None:
        load_config(schema, config, list(overrides))
    data = apply_overrides(read_yaml(config), list(overrides))
    spec = data.get(SECTION)
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ConfigError(f"{config}: '{SECTION}' must be a mapping (root and the generator's options) or null; "
                          f"got {spec!r}")
    try:
        cfg = ShapesConfig.from_dict(spec)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{config}: '{SECTION}': {err}") from None
    if not any(_inside(p, Path(cfg.root).resolve()) for p in strings_in(data.get("data"))):
        return None
    t0 = time.time()
    try:
        manifest, created = ensure_shapes(cfg.root, cfg)
    except FileExistsError as err:
        raise ConfigError(f"{err} ({SECTION}.root={cfg.root})") from None
    if created:
        print(f"created the synthetic shapes data in {cfg.root} ({time.time() - t0:.1f} s)", flush=True)
    return manifest
