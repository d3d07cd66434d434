"""The command line and the test images shared by the benchmarks that caption generated shapes images with a
trained checkpoint."""

from __future__ import annotations

import argparse


def shapes_checkpoint_parser(description: str, batch_size: int, batch_help: str | None = None) -> argparse.ArgumentParser:
    """checkpoint, --images, --seed, --beams, --max-length, --batch-size, --threads; scripts add their own."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint folder (save_pretrained) or Hub id of a shapes model")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--seed", type=int, default=12345, help="seed of the generated test images")
    parser.add_argument("--beams", default="1,3", help="decoding modes, e.g. 1,3")
    parser.add_argument("--max-length", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    parser.add_argument("--threads", type=int, default=None)
    return parser


def shapes_test_set(count: int, seed: int) -> tuple[list, list, list]:
    """`count` generated shapes images from `seed`: (images, their objects, their (W, H) sizes)."""
    import numpy as np

    from caption_model.training.shapes import generate_shapes_example

    rng = np.random.default_rng(seed)
    examples = [generate_shapes_example(rng) for _ in range(count)]
    return [ex.image for ex in examples], [ex.objects for ex in examples], [ex.image.size for ex in examples]
