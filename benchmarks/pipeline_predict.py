"""transformers' ``pipeline("image-classification")`` over a list of image files, as a user
calls it (image paths in, the pipeline's defaults). Prints one JSON line: load and scoring
seconds, images per second of the scoring."""

from __future__ import annotations

import argparse
import json
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pipeline_predict",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", required=True, help="a text file with one image path a line")
    parser.add_argument("--output", required=True)
    parser.add_argument("--batch_size", type=int, default=None,
                        help="the pipeline's batch_size (default: not given, the pipeline's 1)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    from transformers import pipeline

    classifier = pipeline("image-classification", model=args.model, device="cpu")
    loaded = time.perf_counter()
    paths = [line.strip() for line in open(args.images, encoding="utf-8") if line.strip()]
    results = classifier(paths, **({"batch_size": args.batch_size} if args.batch_size else {}))
    done = time.perf_counter()
    with open(args.output, "w", encoding="utf-8") as out:
        for path, result in zip(paths, results):
            out.write(json.dumps({"image": path, "top": result[0]["label"]}) + "\n")
    print(json.dumps({"images": len(paths), "load_seconds": loaded - start,
                      "score_seconds": done - loaded,
                      "images_per_second": len(paths) / (done - loaded)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
