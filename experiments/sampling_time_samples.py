"""A figure of what a sampling-time mark looks like: clean and marked images of finished runs, side by side.

Reads the images a run already made (its results database and artifact cache; nothing is generated): for each run,
one row of the clean model's images and one of the marked model's, for the first ``--n`` prompts of the run's
first seed. The clean and marked image of a column share the prompt and the sampler seed; a sampling-time mark
changes the initial noise itself, so the two differ in layout as well (why paired PSNR / SSIM do not apply to
them: docs/tree_ring.md, "Quality").

    python -m experiments.sampling_time_samples \\
        --run "Gaussian Shading, 128 px=/work/runs-docs/gaussian-shading-128-tiny/results.sqlite" \\
        --run "Tree-Ring, 128 px=/work/runs-docs/tree-ring-128-tiny/results.sqlite" \\
        --n 8 --out docs/img/sampling_time_128.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from markbench.cache import ArtifactStore
from markbench.reports.data import load_results
from markbench.reports.html import find_cache

CELL = 128
LABEL_W = 190


def _row(store: ArtifactStore, key: str, n: int) -> list[np.ndarray]:
    paths = store.image_paths(key)[:n]
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(np.asarray(im.convert("RGB").resize((CELL, CELL), Image.Resampling.NEAREST)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", required=True, metavar="TITLE=RESULTS.sqlite",
                    help="a finished run: its title in the figure and its results database (cache beside it)")
    ap.add_argument("--n", type=int, default=8, help="images per row")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    rows: list[tuple[str, list[np.ndarray]]] = []
    for spec in args.run:
        title, _, db = spec.partition("=")
        results = load_results(Path(db))
        cache, looked = find_cache(results, Path(db), None)
        if cache is None:
            raise SystemExit(f"no artifact cache for {db} (looked in {', '.join(looked)})")
        store = ArtifactStore(cache)
        seed = min(c.seed for c in results.cells)
        cell = next(c for c in results.cells if c.seed == seed and c.defense != "none"
                    and c.model_attack == "none" and c.image_attack == "none")
        rows.append((f"{title}: clean", _row(store, cell.clean_key, args.n)))
        rows.append((f"{title}: marked", _row(store, cell.watermarked_key, args.n)))
    width = LABEL_W + args.n * (CELL + 2)
    canvas = Image.new("RGB", (width, len(rows) * (CELL + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        y = r * (CELL + 2)
        draw.text((4, y + CELL // 2 - 6), label, fill="black")
        for i, arr in enumerate(images):
            canvas.paste(Image.fromarray(arr), (LABEL_W + i * (CELL + 2), y))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    # a docs figure: 256 colours keep it small
    canvas.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"wrote {args.out}: {len(rows)} rows of {args.n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
