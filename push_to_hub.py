"""Publish a checkpoint folder to a Hugging Face Hub model repo (and optionally update the demo Space).

    python push_to_hub.py checkpoints/shapes --repo-id USER/NAME [--private] [--space USER/SPACE] [--dry-run]

Token: HF_TOKEN or the stored login (`hf auth login`). Endpoint: HF_ENDPOINT (default https://huggingface.co).
The checkpoint is loaded and captions a test image before anything is uploaded; the folder itself is never changed.
Exit codes: 0 done, 1 Hub/network failure, 2 bad checkpoint, arguments or project (no app.py for --space).
"""

from __future__ import annotations

import argparse
import os
import sys

from caption_model.hub.card import DEFAULT_LICENSE
from caption_model.hub.checks import CheckpointError
from caption_model.hub.publish import PublishError, dry_run, publish
from caption_model.hub.space import SpaceError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint_dir", help="folder written by train.py / ImageCaptioner.save_pretrained")
    p.add_argument("--repo-id", required=True, help="model repo, USER/NAME (created if missing)")
    p.add_argument("--private", action="store_true", help="create the model repo as private")
    p.add_argument("--commit-message", default="Upload image captioner", help="commit message on the Hub")
    p.add_argument("--revision", default=None, help="branch to commit to (created if missing; default main)")
    p.add_argument("--space", default=None, metavar="USER/SPACE",
                   help="also create/update this Gradio Space and point it at the model")
    p.add_argument("--license", default=DEFAULT_LICENSE, help=f"license id for the cards (default {DEFAULT_LICENSE})")
    p.add_argument("--dataset", default=None,
                   help="Hub dataset id for the card (default: the source that training_config.json records)")
    p.add_argument("--install-source", default=None, metavar="GIT_URL",
                   help="where the model card's install line installs caption_model from, e.g. "
                        "https://github.com/OWNER/REPO or ...@v1.0 (default: $CAPTION_MODEL_SOURCE, else this "
                        "clone's origin remote)")
    p.add_argument("--space-token", default=os.environ.get("HF_SPACE_TOKEN"), metavar="TOKEN",
                   help="with --private --space: a read token the Space loads the private model with (stored as "
                        "its secret HF_TOKEN; default $HF_SPACE_TOKEN)")
    p.add_argument("--dry-run", action="store_true", help="write the folder(s) that would be uploaded; no network")
    p.add_argument("--dry-run-dir", default=None, help="where --dry-run writes (default: a new temporary folder)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.dry_run or args.dry_run_dir:
            out = dry_run(args.checkpoint_dir, args.repo_id, args.dry_run_dir, space_id=args.space,
                          license=args.license, dataset=args.dataset, install_source=args.install_source,
                          private=args.private, space_token=args.space_token)
            print(f"dry run done: nothing was uploaded; inspect {out}")
            return 0
        result = publish(args.checkpoint_dir, args.repo_id, private=args.private,
                         commit_message=args.commit_message, revision=args.revision, space_id=args.space,
                         license=args.license, dataset=args.dataset, install_source=args.install_source,
                         space_token=args.space_token)
    except SpaceError as e:
        print(f"error: {e}", file=sys.stderr)
        print("Nothing was uploaded. Run push_to_hub.py from the project that holds app.py.", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        print("Nothing was uploaded. Fix or re-save the checkpoint (train.py writes a complete folder).",
              file=sys.stderr)
        return 2
    except PublishError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"done: {result.repo_url}" + (f" and {result.space_url}" if result.space_url else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
