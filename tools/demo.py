"""A local web demo of checkpoints: ``python -m tools.demo --checkpoint C [--checkpoint C2 ...] [--port P]
[--gallery DIR]`` serves a page on http://127.0.0.1:P/ where one uploads an image (or picks a demo
image) and gets a caption, asks a question, ranks typed captions, searches a gallery folder by text,
sees the Grad-CAM heat map of the ITM score per word, and, for a demo batch of the shapes world, the
SRCL weight matrix beside the world's truth (which negatives are false negatives).

Every answer comes from the Python API (``inference.load_model_and_preprocess``, ``tasks/pipeline.py``).
A checkpoint can do what its task can (a pre-training or retrieval checkpoint ranks, searches, shows
Grad-CAM and SRCL weights; a caption checkpoint captions; a VQA checkpoint answers): the page lists
each loaded checkpoint's abilities, and asking for one that no loaded checkpoint has gives a message
saying which checkpoint would, not a failure. Several ``--checkpoint`` combine their abilities (the
first one that has an ability serves it).

Why the standard library's ``http.server`` and a hand-written page, not gradio (what BLIP's demo uses):
  * no new dependency: gradio pulls in dozens of packages (FastAPI, uvicorn, pydantic, httpx, ...), some
    heavier than the project itself, and pins versions that fight ours;
  * nothing reaches the network: gradio checks for updates and sends usage analytics by default, and its
    page loads fonts and scripts from CDNs; this page is one self-contained file served from 127.0.0.1
    and works offline, as everything in this project does;
  * it is testable: a real headless browser drives it in the test suite (tests/test_demo.py) in
    seconds, with no server framework to start or mock;
  * the demo needs six JSON endpoints and one page; a framework adds nothing that pays for itself.
The server binds 127.0.0.1 only; it is a demo for one user, not a service (one model call at a time).
"""
from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import math
import os
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional

from PIL import Image, UnidentifiedImageError

from tools.demo_views import ViewConfig, display_image, heat_overlay, png_data_url, srcl_batch

PAGE = Path(__file__).with_name("demo_page.html")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")  # scikit-image's bundled photographs, when installed
# the page's panels and the Pipeline ability each needs
PANELS = {"caption": "caption", "answer": "answer", "rank": "rank", "search": "retrieve", "gradcam": "gradcam",
          "srcl": "retrieve"}
WHO_CAN = {"caption": "a caption checkpoint (run_finetune.py --task caption ...)",
           "answer": "a VQA checkpoint (run_finetune.py --task vqa ...)",
           "rank": "a pre-training or retrieval checkpoint", "retrieve": "a pre-training or retrieval checkpoint",
           "gradcam": "a pre-training or retrieval checkpoint"}


class DemoError(ValueError):
    """A request the demo cannot serve; the message is shown on the page."""


@dataclass
class DemoOptions:
    """The demo's settings (the command line's options)."""

    max_upload_mb: float = 8.0
    max_pixels: int = 40_000_000
    gallery_max: int = 1000
    top_k: int = 6
    srcl_batch: int = 12
    srcl_delta: float = 1.0
    gradcam_layer: Optional[int] = None
    view: ViewConfig = field(default_factory=ViewConfig)


class DemoApp:
    """The checkpoints, the gallery, the demo images and the requests the page makes (``handle``)."""

    def __init__(self, pipelines: dict, gallery: list[str], world: Optional[str], opts: DemoOptions) -> None:
        self.pipelines, self.gallery, self.world, self.opts = pipelines, gallery, world, opts
        self.lock = threading.Lock()  # one model call at a time
        self.demo_images = self._demo_images()

    # ------------------------------------------------------------------ what is loaded
    def serving(self, ability: str):
        """The first loaded pipeline that has ``ability``, or None."""
        from tasks.pipeline import ABILITIES
        return next((p for p in self.pipelines.values() if ability in ABILITIES[p.task]), None)

    def _pipe(self, panel: str):
        pipe = self.serving(PANELS[panel])
        if pipe is None:
            loaded = ", ".join(f"{os.path.basename(c)} ({p.task})" for c, p in self.pipelines.items())
            raise DemoError(f"no loaded checkpoint can do this ({loaded}); load {WHO_CAN[PANELS[panel]]} "
                            "with another --checkpoint")
        return pipe

    def _demo_images(self) -> dict[str, Image.Image]:
        out: dict[str, Image.Image] = {}
        if self.world and os.path.isfile(os.path.join(self.world, "retrieval_test.json")):
            with open(os.path.join(self.world, "retrieval_test.json"), encoding="utf-8") as fh:
                for i, rec in enumerate(json.load(fh)[:6]):
                    out[f"shapes {i + 1}"] = Image.open(os.path.join(self.world, rec["image"])).convert("RGB")
        try:
            import skimage.data
        except ImportError:
            return out
        for name in PHOTOS:
            out[name] = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        return out

    def info(self) -> dict:
        from tasks.pipeline import ABILITIES
        panels = {}
        for panel, ability in PANELS.items():
            pipe = self.serving(ability)
            ok = pipe is not None and (panel != "srcl" or self.world is not None) and (panel != "search" or bool(self.gallery))
            why = ("" if ok else f"needs {WHO_CAN[ability]}" if pipe is None
                   else "needs a shapes world (--shapes DIR)" if panel == "srcl" else "the gallery is empty (--gallery DIR)")
            panels[panel] = {"ok": ok, "why": why, "checkpoint": os.path.basename(pipe.checkpoint) if pipe else None}
        return {"checkpoints": [{"path": c, "task": p.task, "abilities": list(ABILITIES[p.task])}
                                for c, p in self.pipelines.items()],
                "panels": panels, "gallery": len(self.gallery), "world": self.world,
                "max_upload_mb": self.opts.max_upload_mb,
                "demo_images": [{"name": n, "png": png_data_url(display_image(im, ViewConfig(display=64)))}
                                for n, im in self.demo_images.items()]}

    # ------------------------------------------------------------------ inputs
    def image(self, payload: dict) -> Image.Image:
        """The request's image: ``{"demo": name}`` or ``{"data": "data:image/...;base64,..."}``."""
        spec = payload.get("image")
        if not isinstance(spec, dict):
            raise DemoError("no image: upload one or pick a demo image")
        if "demo" in spec:
            if spec["demo"] not in self.demo_images:
                raise DemoError(f"unknown demo image {spec['demo']!r}")
            return self.demo_images[spec["demo"]]
        data = spec.get("data", "")
        try:
            raw = base64.b64decode(data.split(",", 1)[-1], validate=True)
        except (binascii.Error, ValueError, AttributeError):
            raise DemoError("the upload is not base64 data") from None
        if len(raw) > self.opts.max_upload_mb * 2**20:
            raise DemoError(f"the image is too large: {len(raw) / 2**20:.1f} MB (limit {self.opts.max_upload_mb:g} MB)")
        name = spec.get("name") or "the uploaded file"
        try:
            img = Image.open(io.BytesIO(raw))
            if img.width * img.height > self.opts.max_pixels:
                raise DemoError(f"{name} is too large: {img.width} x {img.height} pixels "
                                f"(limit {self.opts.max_pixels:,} pixels)")
            img.load()
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError):
            raise DemoError(f"{name} is not an image (it cannot be read as JPEG, PNG, ...)") from None
        return img.convert("RGB")

    @staticmethod
    def _text(payload: dict, key: str, what: str) -> str:
        text = payload.get(key)
        if not isinstance(text, str) or not text.strip():
            raise DemoError(f"type {what} first")
        return text.strip()

    # ------------------------------------------------------------------ requests
    def handle(self, route: str, payload: dict) -> dict:
        """The JSON answer to ``POST /api/<route>``; ``DemoError`` for a request it cannot serve."""
        from tasks.pipeline import InferenceError
        fn = getattr(self, f"do_{route}", None)
        if fn is None or route not in PANELS:
            raise DemoError(f"unknown request {route!r}")
        with self.lock:
            try:
                return fn(payload)
            except InferenceError as err:
                raise DemoError(str(err)) from None

    def do_caption(self, payload: dict) -> dict:
        return {"caption": self._pipe("caption").caption([self.image(payload)])[0]}

    def do_answer(self, payload: dict) -> dict:
        question = self._text(payload, "question", "a question")
        return {"answer": self._pipe("answer").answer([self.image(payload)], [question])[0]}

    def do_rank(self, payload: dict) -> dict:
        texts = [t.strip() for t in str(payload.get("texts", "")).splitlines() if t.strip()]
        if not texts:
            raise DemoError("type one or more captions, one per line")
        return {"rows": self._pipe("rank").rank(self.image(payload), texts)}

    def do_search(self, payload: dict) -> dict:
        text = self._text(payload, "text", "a search text")
        pipe = self._pipe("search")
        if not self.gallery:
            raise DemoError("the gallery is empty: start the demo with --gallery DIR")
        hits = pipe.retrieve([text], self.gallery, k=self.opts.top_k)[0]
        return {"hits": [{"file": os.path.basename(self.gallery[h["index"]]), "score": h["score"], "itc": h["itc"],
                          "png": png_data_url(display_image(Image.open(self.gallery[h["index"]]), ViewConfig(display=96)))}
                         for h in hits]}

    def do_gradcam(self, payload: dict) -> dict:
        from models.gradcam import GradCAMConfig
        text = self._text(payload, "text", "a caption")
        img = self.image(payload)
        cam = self._pipe("gradcam").gradcam(img, text, GradCAMConfig(layer=self.opts.gradcam_layer))
        shown = display_image(img, self.opts.view)
        size = (shown.height, shown.width)

        def overlay(m):
            return png_data_url(heat_overlay(shown, cam.at_size(m, size), self.opts.view))

        return {"text": cam.text, "score": cam.score, "phrase_png": overlay(cam.phrase_map),
                "image_png": png_data_url(shown),
                "words": [{"word": w, "png": overlay(m)} for w, m in zip(cam.words, cam.word_maps)]}

    def do_srcl(self, payload: dict) -> dict:
        pipe = self._pipe("srcl")
        if self.world is None:
            raise DemoError("no shapes world: start the demo with --shapes DIR (python -m shapesworld --out DIR)")
        return srcl_batch(pipe, self.world, self.opts.srcl_batch, self.opts.srcl_delta, self.opts.view)


def _json_safe(obj: Any) -> Any:
    """NaN and infinities as null (JSON has none)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def make_handler(app: DemoApp, quiet: bool = True):
    """The request handler class of ``app``'s server."""
    page = PAGE.read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: dict) -> None:
            self._send(status, json.dumps(_json_safe(obj)).encode("utf-8"), "application/json")

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path in ("/", "/index.html"):
                self._send(200, page, "text/html; charset=utf-8")
            elif self.path == "/api/info":
                self._json(200, app.info())
            else:
                self._json(404, {"error": f"no page {self.path}"})

        def do_POST(self) -> None:  # noqa: N802
            route = self.path.removeprefix("/api/")
            length = int(self.headers.get("Content-Length") or 0)
            limit = app.opts.max_upload_mb * 2**20 * 4 / 3 + 2**16  # base64 of the largest image, and the rest
            if length > limit:
                self.close_connection = True
                self._json(413, {"error": f"the upload is too large: {length / 2**20:.1f} MB "
                                          f"(limit {app.opts.max_upload_mb:g} MB per image)"})
                return
            try:
                payload = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(payload, dict):
                    raise ValueError
            except ValueError:
                self._json(400, {"error": "the request is not a JSON object"})
                return
            try:
                self._json(200, app.handle(route, payload))
            except DemoError as err:
                self._json(400, {"error": str(err)})

        def log_message(self, fmt: str, *args) -> None:
            if not quiet:
                super().log_message(fmt, *args)

    return Handler


def gallery_files(folder: Optional[str], limit: int) -> list[str]:
    """The image files under ``folder`` (sorted, at most ``limit``); ``FileNotFoundError`` when it is not
    a folder."""
    if folder is None:
        return []
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--gallery {folder}: no such folder")
    files = sorted(str(p) for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    return files[:limit]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DemoOptions()
    ap.add_argument("--checkpoint", action="append", required=True, metavar="C",
                    help="a checkpoint of this project (repeat for several tasks: caption + pre-training ...)")
    ap.add_argument("--port", type=int, default=7860, help="port on 127.0.0.1 (0: any free port)")
    ap.add_argument("--gallery", default=None, metavar="DIR",
                    help="images to search by text (default: the shapes world's test images)")
    ap.add_argument("--shapes", default="data/shapes", metavar="DIR",
                    help="a shapes world (demo images and the SRCL view); ignored when missing")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gradcam-layer", type=int, default=d.gradcam_layer,
                    help="fusion layer of the Grad-CAM maps (default: the middle one; models/gradcam.py)")
    ap.add_argument("--max-upload-mb", type=float, default=d.max_upload_mb, help="largest image file accepted")
    ap.add_argument("--gallery-max", type=int, default=d.gallery_max, help="most gallery images indexed")
    ap.add_argument("--top-k", type=int, default=d.top_k, help="gallery images shown per search")
    ap.add_argument("--srcl-batch", type=int, default=d.srcl_batch, help="images in the SRCL demo batch")
    ap.add_argument("--srcl-delta", type=float, default=d.srcl_delta, help="SRCL's delta for the weights (paper: 1)")
    ap.add_argument("--verbose", action="store_true", help="log every request on stderr")
    return ap


def build_app(args: argparse.Namespace) -> DemoApp:
    """Load the checkpoints and index the gallery; one-line errors (``FileNotFoundError``, ...) for bad input."""
    from inference import load_model_and_preprocess

    pipelines = {}
    for path in args.checkpoint:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--checkpoint {path}: no such file")
        pipelines[path] = load_model_and_preprocess(path, device=args.device)
    world = args.shapes if args.shapes and os.path.isfile(os.path.join(args.shapes, "scenes.json")) else None
    gallery = args.gallery
    if gallery is None and world is not None and os.path.isdir(os.path.join(world, "images", "test")):
        gallery = os.path.join(world, "images", "test")
    opts = DemoOptions(max_upload_mb=args.max_upload_mb, gallery_max=args.gallery_max, top_k=args.top_k,
                       srcl_batch=args.srcl_batch, srcl_delta=args.srcl_delta, gradcam_layer=args.gradcam_layer)
    return DemoApp(pipelines, gallery_files(gallery, args.gallery_max), world, opts)


def main(argv: Optional[list[str]] = None) -> int:
    from engine.cli import run_reporting_errors

    args = build_parser().parse_args(argv)

    def serve() -> int:
        app = build_app(args)
        try:
            server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(app, quiet=not args.verbose))
        except OSError as err:
            print(f"error: cannot serve on 127.0.0.1:{args.port}: {err.strerror} (choose another --port)", file=sys.stderr)
            return 2
        for c, p in app.pipelines.items():
            print(f"{c}: {p.task} checkpoint", flush=True)
        print(f"serving on http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
        return 0

    return run_reporting_errors(serve)


if __name__ == "__main__":
    sys.exit(main())
